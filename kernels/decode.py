"""Attention of a few new query tokens against the static KV cache (layout [B, K, S_max, Hd]).

Decode is memory-bound: every step reads the whole cache once. The einsums below read K and V in their stored layout
(no transpose, no GQA repeat), and int8 caches are dequantized by scaling the scores / probabilities rather than the
[B, K, S, Hd] tensors, so the int8 bytes are the only cache bytes read.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxtx.kernels.reference import alibi_bias, make_mask, masked_softmax


def decode_attention(q, k, v, *, q_positions, kv_positions, window=None, alibi_slopes=None, bias=None,
                     softmax_scale=None, k_scale=None, v_scale=None):
    """q [B, T, H, Hd]; k, v [B, K, S, Hd] (float or int8); q_positions [B, T]; kv_positions [B, S] (-1 = empty slot);
    k_scale, v_scale [B, K, S] for int8 caches; bias [B|1, H, T, S]. Returns [B, T, H, Hd] in q.dtype.

    Key slot s is visible to query t when 0 <= kv_pos[s] <= q_pos[t] and, with a window, q_pos[t] - kv_pos[s] < W.
    """
    B, T, H, Hd = q.shape
    K, S = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"decode_attention: query heads H={H} must be a multiple of kv heads K={K} "
                         f"(q {q.shape}, k {k.shape})")
    G = H // K
    scale = Hd ** -0.5 if softmax_scale is None else softmax_scale
    q5 = q.reshape(B, T, K, G, Hd)
    kk = k if k_scale is None else k.astype(q.dtype)
    s = jnp.einsum("BTKGh,BKSh->BKGTS", q5, kk, preferred_element_type=jnp.float32) * scale
    if k_scale is not None:
        s = s * k_scale.astype(jnp.float32)[:, :, None, None, :]
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        s = s + bias.reshape(bias.shape[0], K, G, T, S)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, T, S, q_positions, kv_positions).reshape(B, K, G, T, S)
    # the cache path is causal by position; empty slots (position -1) are never visible
    mask = make_mask(T, S, causal=True, window=window, q_positions=q_positions, kv_positions=kv_positions)
    p = masked_softmax(s, mask)
    if v_scale is not None:
        p = p * v_scale.astype(jnp.float32)[:, :, None, None, :]
    vv = v if v_scale is None else v.astype(q.dtype)
    o = jnp.einsum("BKGTS,BKSh->BTKGh", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, Hd).astype(q.dtype)
