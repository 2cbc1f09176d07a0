"""The five training objectives as loss terms: (sum of per-item losses, number of items, extra metric sums).

Sums, not means, so gradient accumulation is exact: the step adds sums and counts over micro-batches and divides once
(a mean of per-micro-batch means would weight tokens unequally when micro-batches count different numbers of tokens).
Batch formats come from packing.py / data.py; everything here is traced inside the jitted step.

    causal  next-token CE; a target counts only inside its own document (same segment id, not padding)
    sft     causal CE on response tokens only (loss_mask)
    dpo     -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over response log-probs; ref = frozen params
            (with LoRA: the base with the adapter off, i.e. the same params minus the adapter leaves, no copy)
    mlm     BERT: mlm_prob of real tokens chosen; 80% -> <mask>, 10% -> random token, 10% unchanged; CE on chosen
    span    T5 span corruption: encoder sees sentinels, decoder predicts sentinel + span ... EOS (target_mask)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxtx.config import ModelConfig
from jaxtx.train.chunked_ce import linear_ce_rows, linear_ce_sum
from jaxtx.train.config import TrainConfig
from jaxtx.train.tokenizer import MASK_ID

N_SPECIAL = 4  # PAD, UNK, BOS, EOS: never chosen for masking, never drawn as random replacements


def token_nll(logits_BTV, targets_BT):
    """-log p(target) per position, in float32 whatever the compute dtype."""
    logits = logits_BTV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return lse - picked


def next_token_nll(logits_BTV, tokens_BT):
    """-log p(tokens[t + 1] | tokens[<= t]) at every position t: [B, T]. The last position's target is a dummy
    (causal_weights gives it weight 0). Scoring all T positions instead of slicing the logits to T - 1 saves a copy of
    the largest activation in the forward and a pad of its gradient in the backward (measured: 0.96 s of a 12.9 s
    step, 134M model, 8 x 256 tokens, V = 32k, CPU)."""
    return token_nll(logits_BTV, jnp.roll(tokens_BT, -1, axis=1))


def causal_weights(segment_ids_BT, loss_mask_BT=None):
    """[B, T] weight of the target t+1 predicted at position t: same segment (document) and not padding (and in
    loss_mask); 0 at the last position, which predicts nothing."""
    w = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, 1:] > 0)
    if loss_mask_BT is not None:
        w = w & (loss_mask_BT[:, 1:] > 0)
    return jnp.pad(w.astype(jnp.float32), ((0, 0), (0, 1)))


def mlm_corrupt(tokens_BT, segment_ids_BT, rng, *, prob: float, mask_id: int, vocab: int):
    """BERT masking. Returns (inputs, chosen weights float32)."""
    k_sel, k_kind, k_rand = jax.random.split(rng, 3)
    real = (segment_ids_BT > 0) & (tokens_BT >= N_SPECIAL)
    chosen = real & jax.random.bernoulli(k_sel, prob, tokens_BT.shape)
    u = jax.random.uniform(k_kind, tokens_BT.shape)
    random_tok = jax.random.randint(k_rand, tokens_BT.shape, N_SPECIAL, vocab, dtype=tokens_BT.dtype)
    inputs = jnp.where(chosen & (u < 0.8), mask_id, jnp.where(chosen & (u < 0.9), random_tok, tokens_BT))
    return inputs, chosen.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Objective:
    """loss_terms(params, batch, rng, train, ref_params) -> (loss_sum, count, {metric: sum}).
    Metrics in the dict are sums over items too (divided by count in the step)."""
    name: str
    loss_terms: Callable
    needs_ref: bool = False


def _apply(model, params, *args, rng, train: bool, **kw):
    """Forward with dropout and MoE intermediates; returns (logits, moe aux loss scalar). The dropout rng is passed
    in training only: LoRA adapters (jaxtx.lora.dense) drop their input whenever a "dropout" rng is present."""
    from jaxtx.model import moe_aux_loss
    out, state = model.apply({"params": params}, *args, deterministic=not train, rngs={"dropout": rng} if train else {},
                             mutable=["intermediates"], **kw)
    return out, moe_aux_loss(state.get("intermediates", {}), model.cfg)


def make_objective(model, cfg: ModelConfig, t: TrainConfig, *, mask_id: int = MASK_ID, tok_vocab: int | None = None,
                   chunked_ce: bool = True):
    """The Objective for t.objective. mask_id / tok_vocab: the tokenizer's <mask> id and size (BERT masking); the
    defaults match tokenizers trained by jaxtx.train.tokenizer. chunked_ce: causal, sft and dpo (decoders) compute
    the head and the cross-entropy in chunks (jaxtx.train.chunked_ce), never the [B, T, V] logits; False keeps the
    logits path (the reference the chunked one is tested and benchmarked against)."""
    vocab = tok_vocab or cfg.vocab_size

    def causal(params, batch, rng, train, ref_params=None, mask_key=None):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        w = causal_weights(seg, batch.get(mask_key) if mask_key else None)
        n = w.sum()
        if chunked_ce and cfg.kind == "decoder":
            (x, head_w, layout), aux = _apply(model, params, tokens, segment_ids=seg, rng=rng, train=train,
                                              head_inputs=True)
            if head_w is not None:  # a quantized head (QLoRA) takes the logits path below
                total = linear_ce_sum(x, head_w, jnp.roll(tokens, -1, axis=1), w, w_layout=layout)
                return total + aux * n, n, {"aux_loss": aux * n}
        logits, aux = _apply(model, params, tokens, segment_ids=seg, rng=rng, train=train)
        nll = next_token_nll(logits, tokens)
        return (nll * w).sum() + aux * n, n, {"aux_loss": aux * n}

    def sft(params, batch, rng, train, ref_params=None):
        return causal(params, batch, rng, train, mask_key="loss_mask")

    def seq_logp(params, tokens, seg, mask, rng, train):
        w = causal_weights(seg, mask)
        if chunked_ce and cfg.kind == "decoder":
            (x, head_w, layout), aux = _apply(model, params, tokens, segment_ids=seg, rng=rng, train=train,
                                              head_inputs=True)
            if head_w is not None:  # a quantized head (QLoRA) takes the logits path below
                return -linear_ce_rows(x, head_w, jnp.roll(tokens, -1, axis=1), w, w_layout=layout), aux
        logits, aux = _apply(model, params, tokens, segment_ids=seg, rng=rng, train=train)
        return -(next_token_nll(logits, tokens) * w).sum(-1), aux

    def dpo(params, batch, rng, train, ref_params=None):
        both = {k: jnp.concatenate([batch[k], batch["rejected_" + k]]) for k in ("tokens", "segment_ids", "loss_mask")}
        B = batch["tokens"].shape[0]
        lp, aux = seq_logp(params, both["tokens"], both["segment_ids"], both["loss_mask"], rng, train)
        if ref_params is None:  # LoRA: the reference is the frozen base, the adapter switched off
            from jaxtx import lora
            if not lora.has_lora(params):
                raise ValueError("dpo: no reference params (train state 'ref_params') and no LoRA adapter whose "
                                 "base could serve as the reference")
            ref_params = lora.strip(params)
        ref, _ = seq_logp(jax.lax.stop_gradient(ref_params), both["tokens"], both["segment_ids"], both["loss_mask"],
                          rng, False)
        margin = t.dpo_beta * ((lp[:B] - ref[:B]) - (lp[B:] - ref[B:]))
        losses = -jax.nn.log_sigmoid(margin)
        n = jnp.float32(B)
        return losses.sum() + aux * n, n, {"aux_loss": aux * n, "reward_acc": (margin > 0).sum(),
                                           "reward_margin": margin.sum() / t.dpo_beta}

    def mlm(params, batch, rng, train, ref_params=None):
        k_mask, k_drop = jax.random.split(rng)
        tokens, seg = batch["tokens"], batch["segment_ids"]
        inputs, w = mlm_corrupt(tokens, seg, k_mask, prob=t.mlm_prob, mask_id=mask_id, vocab=vocab)
        logits, aux = _apply(model, params, inputs, None, (seg > 0).astype(jnp.int32), method="masked_lm",
                             rng=k_drop, train=train)
        n = w.sum()
        return (token_nll(logits, tokens) * w).sum() + aux * n, n, {"aux_loss": aux * n}

    def span(params, batch, rng, train, ref_params=None):
        logits, aux = _apply(model, params, batch["inputs"], decoder_input_ids=batch["decoder_inputs"],
                             attention_mask=batch["input_mask"], rng=rng, train=train)
        w = batch["target_mask"].astype(jnp.float32)
        n = w.sum()
        return (token_nll(logits, batch["targets"]) * w).sum() + aux * n, n, {"aux_loss": aux * n}

    fns = {"causal": causal, "sft": sft, "dpo": dpo, "mlm": mlm, "span": span}
    if t.objective not in fns:
        raise ValueError(f"train.objective={t.objective!r}: expected one of {list(fns)}")
    return Objective(t.objective, fns[t.objective], needs_ref=t.objective == "dpo")
