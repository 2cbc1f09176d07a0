"""Short-sequence attention (the CPU path up to dispatch.XLA_MAX_TS scores): materialized scores, one masked
softmax, and a hand-written backward.

The reference (`jaxtx.kernels.reference.attention_reference`) differentiated by autodiff re-derives the softmax
chain (where, max, exp, where, sum, divide) in reverse: about six passes over the [B, K, G, T, S] scores and as many
saved intermediates. Here the forward saves only the normalized probabilities p and the backward is the flash
attention one: dv = p^T do, dp = do v^T, ds = p * (dp - rowsum(do * o)) * scale, dq = ds k, dk = ds^T q. K/V are
never repeated for GQA: q is viewed as [B, T, K, G, Hd] and every einsum carries the G axis.

Shapes: q [B, T, H, Hd], k/v [B, S, K, Hd] -> o [B, T, H, Hd] in q.dtype; scores and p in float32.
No additive `bias` here (its gradient is not implemented): the dispatcher sends biased calls to the reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtx.kernels.reference import MASK_VALUE, alibi_bias, make_mask


def _probs(q5, k, mask, slopes, scale, empty_rows: bool):
    """p [B, K, G, T, S] float32: masked entries exactly 0, a row with no visible key all 0.

    empty_rows=False promises every query sees at least one key: then exp(MASK_VALUE - max) underflows to exactly 0
    for every masked entry and the second select and the zero-sum guard (two passes over the scores) are skipped."""
    B, T, K, G, _ = q5.shape
    S = k.shape[1]
    s = jnp.einsum("BTKGh,BSKh->BKGTS", q5, k, preferred_element_type=jnp.float32) * scale
    if slopes is not None:
        s = s + alibi_bias(slopes, T, S).reshape(1, K, G, T, S)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    if mask is not None and empty_rows:
        p = jnp.where(mask, p, 0.0)
        l = p.sum(-1, keepdims=True)
        return p * (1.0 / jnp.where(l == 0.0, 1.0, l))
    return p * (1.0 / p.sum(-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _dense(q, k, v, q_seg, kv_seg, slopes, causal, window, scale):
    return _dense_fwd(q, k, v, q_seg, kv_seg, slopes, causal, window, scale)[0]


def _mask(T, S, q_seg, kv_seg, causal, window):
    return make_mask(T, S, causal=causal, window=window, segment_ids=q_seg, kv_segment_ids=kv_seg)


def _dense_fwd(q, k, v, q_seg, kv_seg, slopes, causal, window, scale):
    B, T, H, Hd = q.shape
    S, K = k.shape[1], k.shape[2]
    q5 = q.reshape(B, T, K, H // K, Hd)
    # a query i < S always sees key i under every mask here unless the keys carry their own segment ids
    empty_rows = kv_seg is not None or T > S
    p = _probs(q5, k, _mask(T, S, q_seg, kv_seg, causal, window), slopes, scale, empty_rows)
    o = jnp.einsum("BKGTS,BSKh->BTKGh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o.reshape(B, T, H, Hd).astype(q.dtype)
    return o, (q, k, v, o, p, q_seg, kv_seg, slopes)


def _dense_bwd(causal, window, scale, res, do):
    q, k, v, o, p, q_seg, kv_seg, slopes = res
    B, T, H, Hd = q.shape
    K = k.shape[2]
    G = H // K
    q5, do5 = q.reshape(B, T, K, G, Hd), do.reshape(B, T, K, G, Hd)
    f32 = jnp.float32
    dv = jnp.einsum("BKGTS,BTKGh->BSKh", p.astype(do.dtype), do5, preferred_element_type=f32)
    dp = jnp.einsum("BTKGh,BSKh->BKGTS", do5, v, preferred_element_type=f32)
    row = jnp.einsum("BTKGh,BTKGh->BKGT", do5.astype(f32), o.reshape(B, T, K, G, Hd).astype(f32))
    ds = (p * (dp - row[..., None]) * scale).astype(q.dtype)  # masked entries: p = 0, so ds = 0
    dq = jnp.einsum("BKGTS,BSKh->BTKGh", ds, k, preferred_element_type=f32).reshape(B, T, H, Hd)
    dk = jnp.einsum("BKGTS,BTKGh->BSKh", ds, q5, preferred_element_type=f32)
    # segment ids and ALiBi slopes are not trained: None is a zero cotangent
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_attention(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                    alibi_slopes=None, softmax_scale=None):
    """Exact attention with materialized scores and the fused backward above. Same semantics as
    `attention_reference` (a query that sees no key returns zeros); inputs are checked by `jaxtx.kernels.attention`."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    return _dense(q, k, v, segment_ids, kv_segment_ids, slopes, causal, window, scale)
