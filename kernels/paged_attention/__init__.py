"""Paged attention: decode (and a few speculative query tokens) against a paged KV cache.

`paged_attention` checks shapes and runs the XLA reference (reference.py) or, for "pallas_tpu" / "pallas_gpu", the
ragged kernels (B sequences of T tokens are a ragged step of B items). backend="auto": TPU -> "pallas_tpu",
GPU -> "pallas_gpu", CPU -> "xla" (or "pallas_gpu" in interpret mode when interpret=True): `dispatch.kernel_backend`.
`ragged_paged_attention` (ragged.py) is the serving engine's call: decode tokens and prefill chunks of many sequences
on one flat token axis.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxtx.kernels.paged_attention.ragged import RAGGED_BACKENDS, ragged_paged_attention
from jaxtx.kernels.paged_attention.ragged_common import RaggedBlockSizes
from jaxtx.kernels.paged_attention.ragged_reference import ragged_paged_attention_xla
from jaxtx.kernels.paged_attention.reference import paged_attention_reference

PAGED_BACKENDS = ("auto", "xla", "pallas_gpu", "pallas_tpu")


def _check(q, k_pages, v_pages, lengths, page_indices, k_scales, v_scales, window):
    def err(msg):
        raise ValueError(f"paged_attention: {msg} (q {tuple(q.shape)}, k_pages {tuple(k_pages.shape)}, "
                         f"lengths {tuple(lengths.shape)}, page_indices {tuple(page_indices.shape)})")

    if q.ndim not in (3, 4):
        err("q must be [B, H, Hd] or [B, T, H, Hd]")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        err(f"k_pages and v_pages must both be [K, P, page_size, Hd] (v_pages {tuple(v_pages.shape)})")
    B, H, Hd = q.shape[0], q.shape[-2], q.shape[-1]
    K = k_pages.shape[0]
    if k_pages.shape[3] != Hd:
        err(f"page head dim {k_pages.shape[3]} != q head dim {Hd}")
    if H % K:
        err(f"query heads H={H} must be a multiple of kv heads K={K}")
    if tuple(lengths.shape) != (B,) or page_indices.ndim != 2 or page_indices.shape[0] != B:
        err("lengths must be [B] and page_indices [B, pages_per_seq]")
    for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
        if s is not None and tuple(s.shape) not in (tuple(k_pages.shape[:3]), tuple(k_pages.shape[:2])):
            err(f"{name} {tuple(s.shape)} must be [K, P, page_size] (per token) or [K, P] (per page)")
    if (k_scales is None) != (v_scales is None):
        err("give both k_scales and v_scales (int8 pages) or neither")
    if jnp.issubdtype(k_pages.dtype, jnp.integer) and k_scales is None:
        err(f"integer pages ({k_pages.dtype}) need k_scales / v_scales")
    if window is not None and (not isinstance(window, int) or window <= 0):
        err(f"window={window!r} must be a positive int or None")


def paged_attention(q, k_pages, v_pages, lengths, page_indices, *, k_scales=None, v_scales=None, softmax_scale=None,
                    window=None, backend="auto", interpret=False):
    """q [B, H, Hd] (one new token) or [B, T, H, Hd] (the last T tokens, causal among themselves); k/v_pages
    [K, P, page_size, Hd] (float or int8 with k/v_scales [K, P, page_size] or [K, P]); lengths [B] (tokens in the
    sequence, including the T new ones); page_indices [B, pages_per_seq]. Returns q's shape in q.dtype."""
    _check(q, k_pages, v_pages, lengths, page_indices, k_scales, v_scales, window)
    if backend not in PAGED_BACKENDS:
        raise ValueError(f"paged_attention: backend={backend!r}; expected one of {PAGED_BACKENDS}")
    if backend == "auto":
        from jaxtx.kernels.dispatch import kernel_backend  # late: dispatch imports the kernel packages

        backend = kernel_backend("xla", interpret=interpret)
    if backend == "xla":
        return paged_attention_reference(q, k_pages, v_pages, lengths, page_indices, k_scales=k_scales,
                                         v_scales=v_scales, softmax_scale=softmax_scale, window=window)
    squeeze = q.ndim == 3
    q4 = q[:, None] if squeeze else q
    B, T, H, Hd = q4.shape
    K, P, ps, _ = k_pages.shape
    scale = float(Hd ** -0.5 if softmax_scale is None else softmax_scale)
    if k_scales is not None:
        if k_scales.ndim == 2:  # per page -> per token (a [K, P, ps] f32 array, Hd x smaller)
            k_scales = jnp.broadcast_to(k_scales[:, :, None], (K, P, ps))
            v_scales = jnp.broadcast_to(v_scales[:, :, None], (K, P, ps))
        k_scales, v_scales = k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)
    # B sequences of T query tokens each are a ragged step with cu_q_lens = 0, T, 2T, ...: the ragged kernels with one
    # item (q_tokens >= T) per sequence
    if backend == "pallas_gpu":
        from jaxtx.kernels.paged_attention.ragged_gpu import ragged_paged_attention_gpu as kernel
    else:
        from jaxtx.kernels.paged_attention.ragged_tpu import ragged_paged_attention_tpu as kernel
    o = kernel(q4.reshape(B * T, H, Hd), k_pages, v_pages, lengths.astype(jnp.int32),
               jnp.clip(page_indices.astype(jnp.int32), 0, P - 1), jnp.arange(B + 1, dtype=jnp.int32) * T,
               jnp.int32(B), k_scales=k_scales, v_scales=v_scales, window=window, scale=scale, interpret=interpret,
               block_sizes=RaggedBlockSizes(q_tokens=1 << (T - 1).bit_length()))
    o = o.reshape(B, T, H, Hd)
    return o[:, 0] if squeeze else o


__all__ = ["RAGGED_BACKENDS", "RaggedBlockSizes", "paged_attention", "paged_attention_reference",
           "ragged_paged_attention", "ragged_paged_attention_xla"]
