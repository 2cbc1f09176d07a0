"""Plain-jnp attention: the reference every kernel is tested against, and the XLA path for short sequences.

Shapes (legend in docs/design.md): q [B, T, H, Hd], k/v [B, S, K, Hd], G = H // K query heads share one kv head.
K/V are never repeated: q is viewed as [B, T, K, G, Hd] and the einsums broadcast over G.
"""
from __future__ import annotations

import jax.numpy as jnp

# A finite "minus infinity": exp() of it underflows to exactly 0 in f32 and bf16, and it never makes NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_mask(T, S, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
              q_positions=None, kv_positions=None):
    """Boolean visibility mask [B|1, 1, 1, T, S] (broadcasts against scores [B, K, G, T, S]); None when all visible.

    Without positions, indices are positions (top-left aligned when T != S). With positions, a key whose position is
    negative (an empty cache slot or padding) is never visible.
    """
    qp = jnp.arange(T)[None, :] if q_positions is None else q_positions  # [B|1, T]
    kp = jnp.arange(S)[None, :] if kv_positions is None else kv_positions  # [B|1, S]
    mask = None

    def _and(m, new):
        return new if m is None else m & new

    if q_positions is not None or kv_positions is not None:
        mask = _and(mask, (kp >= 0)[:, None, :])
    if causal:
        mask = _and(mask, kp[:, None, :] <= qp[:, :, None])
    if window is not None:
        mask = _and(mask, qp[:, :, None] - kp[:, None, :] < window)
        if not causal:  # bidirectional window: symmetric band
            mask = _and(mask, kp[:, None, :] - qp[:, :, None] < window)
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = _and(mask, segment_ids[:, :, None] == kv_seg[:, None, :])
    elif kv_segment_ids is not None:
        mask = _and(mask, (kv_segment_ids != 0)[:, None, :])
    return None if mask is None else mask[:, None, None, :, :]


def alibi_bias(alibi_slopes, T, S, q_positions=None, kv_positions=None):
    """-slope * |i - j| as [B|1, K?..] -> returned as [B|1, H, T, S] float32."""
    qp = jnp.arange(T)[None, :] if q_positions is None else q_positions
    kp = jnp.arange(S)[None, :] if kv_positions is None else kv_positions
    dist = jnp.abs(qp[:, :, None] - kp[:, None, :]).astype(jnp.float32)  # [B|1, T, S]
    return -alibi_slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None, :, :]


def masked_softmax(s, mask):
    """Softmax over the last axis of float32 scores; masked entries get exactly 0, and a row with no visible entry is
    all zeros (never NaN, never the uniform average)."""
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(l == 0.0, 1.0, l)


def attention_reference(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                        alibi_slopes=None, bias=None, softmax_scale=None, q_positions=None, kv_positions=None):
    """Exact softmax attention in float32, materializing [B, K, G, T, S] scores. Returns [B, T, H, Hd] in q.dtype.

    A query that sees no key returns zeros (not the mean of V), matching the flash kernels.
    """
    B, T, H, Hd = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = Hd ** -0.5 if softmax_scale is None else softmax_scale
    q5 = q.reshape(B, T, K, G, Hd)
    s = jnp.einsum("BTKGh,BSKh->BKGTS", q5, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:  # [B|1, H|1, T, S] -> [B|1, K|1, G|1, T, S]
        bias = jnp.asarray(bias, jnp.float32)
        bh = bias.shape[1]
        s = s + (bias.reshape(bias.shape[0], K, G, T, S) if bh == H else bias[:, :, None])
    if alibi_slopes is not None:
        ab = alibi_bias(alibi_slopes, T, S, q_positions, kv_positions)
        s = s + ab.reshape(ab.shape[0], K, G, T, S)
    mask = make_mask(T, S, causal=causal, window=window, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                     q_positions=q_positions, kv_positions=kv_positions)
    p = masked_softmax(s, mask)
    o = jnp.einsum("BKGTS,BSKh->BTKGh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, Hd).astype(q.dtype)
