"""Paged decode attention for GPU: a Pallas kernel lowered through Triton.

One program per (sequence b, kv head). Its rows are the T query tokens x G query heads that share the kv head
(GQA native: each K/V page is read once for all G heads). The kernel walks the sequence's page table, `ppb` pages per
step (a gather of [ppb, page_size, Hd]), with an online softmax; the loop stops at the last page holding a token
(`lengths`) and starts at the first page inside the sliding window. int8 pages are dequantized in the kernel: K scales
multiply the scores' columns, V scales the probabilities' columns, so no dequantized page is ever written.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxtx.kernels.reference import MASK_VALUE


def _paged_kernel(q_ref, k_ref, v_ref, ks_ref, vs_ref, pidx_ref, len_ref, o_ref, *, T, G, ppb, scale, window):
    # q_ref [R, Hd] (rows r = t * G + g, padded); k_ref, v_ref [P, ps, Hd]; ks_ref, vs_ref [P, ps] or None;
    # pidx_ref [npp] page table of this sequence; len_ref [1]; o_ref [R, Hd]
    R, Hd = q_ref.shape
    ps = k_ref.shape[1]
    bk = ppb * ps
    length = len_ref[0]
    q = q_ref[...]
    q_pos = length - T + jnp.arange(R) // G  # [R]; padded rows r >= T*G get positions past the end (dropped)

    def body(step, carry):
        m, l, acc = carry
        pages = pidx_ref[pl.ds(step * ppb, ppb)]
        k = k_ref[pages].reshape(bk, Hd)
        v = v_ref[pages].reshape(bk, Hd)
        if ks_ref is not None:
            k = k.astype(q.dtype)
        s = plgpu.dot(q, k, trans_b=True) * scale
        if ks_ref is not None:
            s = s * ks_ref[pages].reshape(1, bk)
        kv_pos = step * bk + jnp.arange(bk)
        mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < length)
        if window is not None:
            mask = mask & (q_pos[:, None] - kv_pos[None, :] < window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=1)
        if vs_ref is not None:
            p = p * vs_ref[pages].reshape(1, bk)
            v = v.astype(q.dtype)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return m_new, l, acc

    hi = pl.cdiv(length, bk)
    lo = 0 if window is None else jnp.maximum(0, (length - T - window + 1) // bk)
    init = (jnp.full((R,), MASK_VALUE, jnp.float32), jnp.zeros((R,), jnp.float32), jnp.zeros((R, Hd), jnp.float32))
    m, l, acc = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / jnp.where(l > 0.0, l, 1.0)[:, None]).astype(o_ref.dtype)


def paged_attention_gpu_core(q_r, k_pages, v_pages, k_scales, v_scales, lengths, page_indices, *, T, G, scale,
                             window, interpret):
    """q_r [B, K, R, Hd] (R = padded T*G, power of two >= 16); pages [K, P, ps, Hd]; scales [K, P, ps] or None;
    lengths [B]; page_indices [B, npp] -> [B, K, R, Hd]."""
    B, K, R, Hd = q_r.shape
    _, P, ps, _ = k_pages.shape
    if Hd & (Hd - 1) or Hd < 16 or ps & (ps - 1):
        raise ValueError(f"paged_attention (pallas_gpu): head dim {Hd} must be a power of two >= 16 and page_size "
                         f"{ps} a power of two (Triton tiles); pages {tuple(k_pages.shape)}")
    ppb = max(1, 16 // ps)
    npp = -(-page_indices.shape[1] // ppb) * ppb
    page_indices = jnp.pad(page_indices, ((0, 0), (0, npp - page_indices.shape[1])))
    page_spec = pl.BlockSpec((None, P, ps, Hd), lambda b, h: (h, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, P, ps), lambda b, h: (h, 0, 0))
    kernel = functools.partial(_paged_kernel, T=T, G=G, ppb=ppb, scale=scale, window=window)
    return pl.pallas_call(
        kernel,
        grid=(B, K),
        in_specs=[pl.BlockSpec((None, None, R, Hd), lambda b, h: (b, h, 0, 0)), page_spec, page_spec,
                  None if k_scales is None else scale_spec, None if v_scales is None else scale_spec,
                  pl.BlockSpec((None, npp), lambda b, h: (b, 0)), pl.BlockSpec((1,), lambda b, h: (b,))],
        out_specs=pl.BlockSpec((None, None, R, Hd), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(q_r.shape, q_r.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxtx_paged_attention",
    )(q_r, k_pages, v_pages, k_scales, v_scales, page_indices, lengths)
