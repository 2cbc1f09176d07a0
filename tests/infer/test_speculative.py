"""Speculative decoding end to end: greedy equals target greedy, sampled sequences follow the target's distribution
(closed form on Markov chains), draft == target accepts everything."""
import itertools

import numpy as np
import pytest
from scipy import stats

from jaxtx.infer import Sampling, generate
from jaxtx.infer.speculative import speculative_generate

from infer_models import markov, small_model

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
    window, wp = small_model("window")
    with pytest.raises(ValueError, match="sliding window"):
        speculative_generate(window, wp, target, tp, [[1, 2]], max_new_tokens=4)
