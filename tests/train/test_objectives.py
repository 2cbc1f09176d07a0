"""Each objective: the loss counts exactly the items it should (closed-form counts and sums against unpacked
references), and the loss falls when a tiny model trains on a small synthetic set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import TINY_BERT, TINY_T5, run_cfg

from jaxtx import model as model_lib
from jaxtx.train import packing
from jaxtx.train.objectives import causal_weights, make_objective, mlm_corrupt, token_nll
from jaxtx.train.optim import make_optimizer
from jaxtx.train.step import init_params, make_train_step
from jaxtx.train.tokenizer import EOS

RNG = jax.random.key(0)


def _setup(objective, extra=(), model=None):
    kw = {"model": model} if model else {}
    cfg = run_cfg([f"train.objective={objective}", "train.seq_len=16", "train.batch_size=4", *extra],
                  **kw)
    mc = cfg.model_config()
    m = model_lib.build(mc)
    return cfg, mc, m, init_params(m, mc, jax.random.key(1))


def test_causal_packed_loss_equals_sum_of_documents_alone():
    """Packing two documents in a row changes nothing: same count and same loss sum as each document on its own.
    This holds only if attention, positions and targets all stop at the document boundary."""
    cfg, mc, m, p = _setup("causal")
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 500, n).tolist() for n in (4, 10, 7, 7)]  # with EOS: 5+11 and 8+8 = two rows of 16
    rows = packing.pack_documents(docs, 16)
    assert rows["tokens"].shape == (2, 16)
    np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 5 + [2] * 11)
    obj = make_objective(m, mc, cfg.train)
    total, n, _ = obj.loss_terms(p, {k: jnp.asarray(v) for k, v in rows.items()}, RNG, False)
    assert float(n) == sum(len(d) for d in docs)  # each doc: len(d) targets (its tokens after the first, then EOS)
    ref = 0.0
    for d in docs:
        ids = jnp.asarray([d + [EOS]])
        logits = m.apply({"params": p}, ids)
        ref += float(token_nll(logits[:, :-1], ids[:, 1:]).sum())
    np.testing.assert_allclose(float(total), ref, rtol=2e-5)


def test_causal_weights_never_cross_documents_or_padding():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(causal_weights(seg)), [[1, 0, 1, 1, 0, 0, 0]])  # last: no target


def test_sft_counts_response_tokens_only():
    cfg, mc, m, p = _setup("sft", ["data.source=jsonl", "data.path=x"])
    pairs = [([11, 12, 13], [20, 21]), ([30] * 6, [40, 41, 42, 43])]
    rows = packing.prompt_response_rows(pairs, 16)
    obj = make_objective(m, mc, cfg.train)
    total, n, _ = obj.loss_terms(p, {k: jnp.asarray(v) for k, v in rows.items()}, RNG, False)
    assert float(n) == (2 + 1) + (4 + 1)  # response + EOS of each row
    ref = 0.0
    for pr, rs in pairs:
        ids = jnp.asarray([pr + rs + [EOS]])
        nll = token_nll(m.apply({"params": p}, ids)[:, :-1], ids[:, 1:])[0]
        ref += float(nll[len(pr) - 1:].sum())  # predictions of the response tokens and EOS
    np.testing.assert_allclose(float(total), ref, rtol=2e-5)


def test_mlm_masking_rates_and_exclusions():
    B, T = 64, 512
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 500, (B, T)).astype(np.int32)
    tokens[:, :3] = [2, 0, 3]  # specials are never chosen
    seg = np.ones((B, T), np.int32)
    seg[:, 400:] = 0  # padding is never chosen
    inputs, w = mlm_corrupt(jnp.asarray(tokens), jnp.asarray(seg), RNG, prob=0.15, mask_id=5, vocab=512)
    inputs, chosen = np.asarray(inputs), np.asarray(w) > 0
    eligible = (seg > 0) & (tokens >= 4)
    assert not chosen[~eligible].any()
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # unchosen tokens are untouched
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    c_in, c_tok = inputs[chosen], tokens[chosen]
    frac_mask = (c_in == 5).mean()
    frac_same = (c_in == c_tok).mean()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015  # 10% kept (+ random hits of itself)
    assert abs(1 - frac_mask - frac_same - 0.1) < 0.015  # 10% random


def test_mlm_loss_counts_chosen_tokens():
    cfg, mc, m, p = _setup("mlm", model=TINY_BERT)
    rows = {"tokens": jnp.asarray(np.random.default_rng(1).integers(4, 500, (4, 16)), jnp.int32),
            "segment_ids": jnp.ones((4, 16), jnp.int32).at[:, 12:].set(0)}
    obj = make_objective(m, mc, cfg.train, mask_id=5, tok_vocab=512)
    _, n, _ = obj.loss_terms(p, rows, RNG, False)
    k_mask, _ = jax.random.split(RNG)
    _, w = mlm_corrupt(rows["tokens"], rows["segment_ids"], k_mask, prob=0.15, mask_id=5, vocab=512)
    assert float(n) == float(w.sum()) > 0


def test_span_corruption_is_invertible_and_counts():
    rng = np.random.default_rng(0)
    toks = rng.integers(200, 500, 100).astype(np.int32)
    sentinels = np.arange(100, 200)
    inp, tgt = packing.span_corrupt(toks, 100, sentinels, 0.15, 3.0, rng)
    noise, spans = packing.span_lengths(100, 0.15, 3.0)
    assert len(tgt) == noise + spans + 1 and len(inp) == 100 - noise + spans + 1
    # put each span back in place of its sentinel: the original comes back
    spans_of, cur = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            cur = t
            spans_of[cur] = []
        else:
            spans_of[cur].append(t)
    rebuilt = [x for t in inp[:-1] for x in (spans_of[t] if t in spans_of else [t])]
    np.testing.assert_array_equal(rebuilt, toks)
    raw, tl = packing.span_raw_length(32, 0.15, 3.0)
    n_, s_ = packing.span_lengths(raw, 0.15, 3.0)
    assert raw - n_ + s_ + 1 <= 32 and tl == n_ + s_ + 1


def test_dpo_loss_is_log2_at_the_reference_and_counts_pairs():
    cfg, mc, m, p = _setup("dpo", ["data.source=jsonl", "data.path=x"])
    good = packing.prompt_response_rows([([11, 12], [20, 21, 22])] * 3, 16)
    bad = packing.prompt_response_rows([([11, 12], [30, 31])] * 3, 16)
    batch = {**{k: jnp.asarray(v) for k, v in good.items()},
             **{"rejected_" + k: jnp.asarray(v) for k, v in bad.items()}}
    obj = make_objective(m, mc, cfg.train)
    total, n, extra = obj.loss_terms(p, batch, RNG, False, p)
    assert float(n) == 3
    np.testing.assert_allclose(float(total) / 3, np.log(2), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the loss falls
def _synthetic(objective, rng):
    """A small learnable set: rows that repeat a short random pattern (one fixed batch, memorized)."""
    pat = rng.integers(100, 400, (4, 4))
    toks = np.tile(pat, (1, 4)).astype(np.int32)  # [4, 16]
    if objective in ("causal", "mlm"):
        return {"tokens": toks, "segment_ids": np.ones_like(toks)}
    if objective == "span":
        fn_rows = {"inputs": toks, "input_mask": np.ones_like(toks), "targets": toks[:, ::-1][:, :8].copy(),
                   "target_mask": np.ones((4, 8), np.int32)}
        fn_rows["decoder_inputs"] = np.concatenate([np.zeros((4, 1), np.int32), fn_rows["targets"][:, :-1]], 1)
        return fn_rows
    pairs = [(list(r[:4]), list(r[4:10])) for r in toks]
    rows = packing.prompt_response_rows(pairs, 16)
    if objective == "sft":
        return rows
    bad = packing.prompt_response_rows([(p, list(np.roll(r, 1))) for p, r in pairs], 16)
    return {**rows, **{"rejected_" + k: v for k, v in bad.items()}}


@pytest.mark.parametrize("objective,model", [("causal", None), ("sft", None), ("dpo", None), ("mlm", TINY_BERT),
                                             ("span", TINY_T5)])
def test_loss_falls(objective, model):
    extra = ["data.source=jsonl", "data.path=x"] if objective in ("sft", "dpo") else []
    # T5 (tied head rescaled by D**-0.5, no attention scaling) starts slowly: a higher lr and more steps
    lr, steps = ("1e-2", 50) if objective == "span" else ("3e-3", 30)
    extra += [f"optim.lr={lr}", "optim.warmup_steps=0", f"train.steps={steps}", "train.mlm_prob=0.3",
              "train.target_len=8"]
    cfg, mc, m, p = _setup(objective, extra, model=model)
    opt = make_optimizer(cfg.optim, cfg.train.steps)
    state = {"step": jnp.int32(0), "skipped": jnp.int32(0), "params": p, "opt_state": opt.init(p)}
    if objective == "dpo":
        state["ref_params"] = jax.tree.map(jnp.copy, p)
    step = make_train_step(m, mc, cfg, opt, objective=make_objective(m, mc, cfg.train, mask_id=5, tok_vocab=512))
    batch = {k: jnp.asarray(v) for k, v in _synthetic(objective, np.random.default_rng(0)).items()}
    losses = []
    for _ in range(steps):
        state, met = step(state, batch)
        losses.append(float(met["loss"]))
    assert losses[-1] < 0.5 * losses[0], (objective, losses[0], losses[-1])
    if objective == "dpo":
        assert float(met["reward_acc"]) == 1.0
