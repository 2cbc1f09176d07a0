"""Plain-jnp paged attention: gathers each sequence's pages into a contiguous cache and reuses `decode_attention`.

Positions: sequence b holds lengths[b] tokens; its T query tokens are the last T of them (positions
lengths[b] - T .. lengths[b] - 1), so T = 1 is ordinary decode and T > 1 verifies T speculative tokens causally.
Slot s of page page_indices[b, s // page_size] holds position s.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxtx.kernels.decode import decode_attention


def paged_attention_reference(q, k_pages, v_pages, lengths, page_indices, *, k_scales=None, v_scales=None,
                              softmax_scale=None, window=None):
    """q [B, H, Hd] or [B, T, H, Hd]; k/v_pages [K, P, page_size, Hd]; lengths [B]; page_indices [B, pages_per_seq];
    k/v_scales [K, P, page_size] (per token) or [K, P] (per page) for int8 pages. Returns q's shape, q.dtype."""
    squeeze = q.ndim == 3
    q4 = q[:, None] if squeeze else q
    B, T = q4.shape[:2]
    K, _, ps, Hd = k_pages.shape
    npp = page_indices.shape[1]

    def gather(pages):  # [K, P, ps, ...] -> [B, K, npp * ps, ...]
        g = pages[:, page_indices]  # [K, B, npp, ps, ...]
        g = jnp.moveaxis(g, 1, 0)
        return g.reshape(B, K, npp * ps, *pages.shape[3:])

    def gather_scale(s):
        if s is None:
            return None
        if s.ndim == 2:  # per page -> per token
            s = jnp.broadcast_to(s[:, :, None], (K, s.shape[1], ps))
        return gather(s)

    kv_pos = jnp.arange(npp * ps)[None, :]
    kv_pos = jnp.where(kv_pos < lengths[:, None], kv_pos, -1)
    q_pos = lengths[:, None] - T + jnp.arange(T)[None, :]
    o = decode_attention(q4, gather(k_pages), gather(v_pages), q_positions=q_pos, kv_positions=kv_pos,
                         window=window, softmax_scale=softmax_scale, k_scale=gather_scale(k_scales),
                         v_scale=gather_scale(v_scales))
    return o[:, 0] if squeeze else o
