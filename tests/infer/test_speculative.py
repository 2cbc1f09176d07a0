"""Speculative decoding end to end: greedy equals target greedy, sampled sequences follow the target's distribution
(closed form on Markov chains), draft == target accepts everything; the same for sliding-window models decoding far
past the window, and the caches are left honest (lengths = next position, no rejected draft left in a slot)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxtx.infer import GREEDY, Sampling, for_decoding, generate
from jaxtx.infer import generation, speculative
from jaxtx.infer.speculative import speculative_generate

from infer_models import full_forward, markov, naive_greedy, small_model

P_T = np.array([[0.1, 0.5, 0.3, 0.1], [0.3, 0.1, 0.2, 0.4], [0.25, 0.25, 0.25, 0.25], [0.6, 0.1, 0.1, 0.2]])
P_D = np.array([[0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25], [0.2, 0.2, 0.2, 0.4]])


def _joint(table, start, n):
    probs = {}
    for seq in itertools.product(range(4), repeat=n):
        prev, p = start, 1.0
        for t in seq:
            p *= table[prev, t]
            prev = t
        probs[seq] = p
    return probs


@pytest.mark.parametrize("k", [1, 3])
def test_sampled_sequences_follow_the_target(k):
    target, tp = markov(P_T)
    draft, dp = markov(P_D)
    n_rows, n_new = 4096, 3
    res = speculative_generate(target, tp, draft, dp, [[0]] * n_rows, max_new_tokens=n_new, k=k,
                               sampling=Sampling(temperature=1.0), seed=list(range(n_rows)))
    joint = _joint(P_T, 0, n_new)
    cells = list(joint)
    counts = np.array([sum(tuple(t) == c for t in res.tokens) for c in cells])
    assert counts.sum() == n_rows
    expected = np.array([joint[c] for c in cells]) * n_rows
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # the draft's own chain is far from the target's: the same test rejects it
    dj = _joint(P_D, 0, n_new)
    assert stats.chisquare(counts, np.array([dj[c] for c in cells]) * n_rows).pvalue < 1e-6
    assert 0.0 < res.acceptance_rate < 1.0


def test_markov_draft_equal_target_accepts_all():
    target, tp = markov(P_T)
    res = speculative_generate(target, tp, target, tp, [[0]] * 64, max_new_tokens=9, k=4,
                               sampling=Sampling(temperature=1.0), seed=list(range(64)))
    # 9 tokens = the one from prefill + 2 rounds of k + 1 = 5 (the second cut to 3)
    assert res.acceptance_rate == 1.0 and res.rounds == 2 * 64


@pytest.mark.parametrize("family", ["llama", pytest.param("moe", marks=pytest.mark.slow)])
def test_greedy_equals_target_greedy(family):
    target, tp = small_model(family)
    draft, dp = small_model("llama", ("n_layers=1", "init_std=0.2"))
    prompts = [[5, 17, 3], [9, 1, 2, 60, 33, 7, 8]]
    ref = generate(target, tp, prompts, max_new_tokens=12)
    res = speculative_generate(target, tp, draft, dp, prompts, max_new_tokens=12, k=3)
    assert res.tokens == ref.tokens
    # draft == target accepts everything; a stop token inside an accepted run cuts the row there
    eos = ref.tokens[1][5]
    same = speculative_generate(target, tp, target, tp, prompts, max_new_tokens=12, k=3, eos_id=eos)
    assert same.acceptance_rate == 1.0
    assert same.tokens == [t[: t.index(eos)] if eos in t else t for t in ref.tokens]


def test_incompatible_draft_is_refused():
    target, tp = small_model("llama")
    draft, dp = small_model("llama", ("vocab_size=98",))
    with pytest.raises(ValueError, match="vocab_size=98"):
        speculative_generate(target, tp, draft, dp, [[1, 2]], max_new_tokens=4)
    with pytest.raises(ValueError, match="k=0"):
        speculative_generate(target, tp, target, tp, [[1, 2]], max_new_tokens=4, k=0)


# ------------------------------------------------------------------------------------------------ sliding window
W8 = ("window=8",)
WINDOW_PROMPTS = [[5, 17, 3, 44, 9], [9, 1, 2]]


def window_pair(target_unrolled=False):
    """A windowed target and a weaker windowed draft (different weights, so drafts get rejected), one of the two with
    unrolled layers (per-layer cache tuples), the other scanned (stacked cache)."""
    target, tp = small_model("llama", W8)
    draft, dp = small_model("llama", W8 + ("n_layers=1", "init_std=0.2"))
    if target_unrolled:
        target, tp = for_decoding(target, tp)
    else:
        draft, dp = for_decoding(draft, dp)
    return target, tp, draft, dp


@pytest.mark.parametrize("target_unrolled", [False, True])
def test_window_greedy_equals_target_greedy(target_unrolled):
    """40 new tokens with window 8: every ring-buffer slot is rewritten several times, and rejected drafts (written
    ahead of the kept tokens) must never stand in for a kept one."""
    target, tp, draft, dp = window_pair(target_unrolled)
    ref = generate(target, tp, WINDOW_PROMPTS, max_new_tokens=40)
    assert ref.tokens[0] == naive_greedy(target, tp, WINDOW_PROMPTS[0], 40)  # the ring buffer itself is right
    res = speculative_generate(target, tp, draft, dp, WINDOW_PROMPTS, max_new_tokens=40, k=4)
    assert res.tokens == ref.tokens
    assert 0.0 < res.acceptance_rate < 1.0  # rejections happened, so the rollback was exercised


def test_window_draft_equal_target_accepts_all():
    target, tp = small_model("llama", W8)
    ref = generate(target, tp, WINDOW_PROMPTS, max_new_tokens=40)
    same = speculative_generate(target, tp, target, tp, WINDOW_PROMPTS, max_new_tokens=40, k=4)
    assert same.acceptance_rate == 1.0 and same.tokens == ref.tokens


def test_window_sampled_tokens_are_in_the_targets_top_k():
    """Sampling with top_k=2 from a windowed target: every emitted token must be one of the two most likely under a
    full (cache-free) forward pass of the target over the emitted sequence; a stale or lost key would move the
    target's distribution and let tokens outside the true top 2 through."""
    target, tp, draft, dp = window_pair()
    res = speculative_generate(target, tp, draft, dp, WINDOW_PROMPTS, max_new_tokens=40, k=4,
                               sampling=Sampling(temperature=1.0, top_k=2), seed=[3, 4])
    assert 0.0 < res.acceptance_rate < 1.0
    for prompt, toks in zip(WINDOW_PROMPTS, res.tokens):
        assert len(toks) == 40
        seq = np.array([prompt + toks])
        logits = np.asarray(full_forward(target)(tp, jnp.asarray(seq)))[0]
        top2 = np.argsort(logits, axis=-1)[:, -2:]
        for j, tok in enumerate(toks):
            assert tok in top2[len(prompt) + j - 1], (j, tok)


def _raw_run(target, tp, draft, dp, prompts, n, k, sampling=GREEDY):
    """speculative_generate's device program, returning its final state (the caches included)."""
    d = generation.prepare(target, prompts, None, n, None, 0, True)
    _, packed = generation.stop_arg(None, None)
    run = generation.compiled(speculative._run, target, draft, static_argnames=("k", "max_new", "max_len", "sampling"))
    res = run(tp, dp, d.ids, d.lens, d.live, d.seeds, packed, k=k, max_new=n,
              max_len=speculative._max_len(d.ids.shape[1], n, k, 1 << 62), sampling=sampling)
    return d, jax.tree.map(np.asarray, res)


@pytest.mark.parametrize("window", [False, True])
def test_caches_are_honest_after_speculative_generation(window):
    """After the last round each cache's `lengths` is the row's next position: prompt + tokens emitted - 1 (the last
    emitted token is not fed to the models), one less for the draft when its last draft is still pending; no slot
    holds a position >= lengths (no rejected draft survives), every kept position is held exactly once, and a window
    cache holds the whole last window."""
    extra = W8 if window else ()
    target, tp = small_model("llama", extra)
    draft, dp = small_model("llama", extra + ("n_layers=1", "init_std=0.2"))
    k, n = 4, 30
    d, res = _raw_run(target, tp, draft, dp, WINDOW_PROMPTS, n, k)
    assert 0 < res["n_acc"].sum() < res["rounds"].sum() * k
    want = np.where(d.live, d.lens + res["count"] - 1, 0)
    np.testing.assert_array_equal(res["tcache"].lengths, want)
    gap = want - res["dcache"].lengths
    assert set(gap.tolist()) <= {0, 1}
    for c in (res["tcache"], res["dcache"]):
        S = c.pos.shape[1]
        assert S == (8 + k if window else d.ids.shape[1] + n + k + 1)
        for b in range(len(want)):
            held = c.pos[b][c.pos[b] >= 0]
            assert (held < c.lengths[b]).all(), (b, held, c.lengths[b])
            assert len(set(held.tolist())) == len(held)
            lo = max(0, c.lengths[b] - 8) if window else 0
            assert set(range(lo, c.lengths[b])) <= set(held.tolist())
