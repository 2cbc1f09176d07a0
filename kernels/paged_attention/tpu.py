"""Paged decode attention for TPU: a Pallas Mosaic kernel whose K/V index maps read the page table.

Grid (B, K, pages_per_seq). `lengths` and the page table are scalar-prefetched into SMEM, so the BlockSpec index map
of K/V returns the physical page `page_indices[b, p]` and the pipeline DMAs exactly one [page_size, Hd] page per step
(pages past the sequence end, or before the sliding window, map to an already-fetched page: no DMA, and `pl.when`
skips their compute). The running max / sum / accumulator live in VMEM scratch across the page axis ("arbitrary").
Rows are the T query tokens x G query heads of one kv head (GQA native). int8 pages are dequantized in VMEM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxtx.kernels.reference import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))


def _page_range(length, T, ps, window, npp):
    hi = jnp.minimum(pl.cdiv(length, ps), npp)
    lo = 0 if window is None else jnp.maximum(0, (length - T - window + 1) // ps)
    return lo, hi


def _paged_kernel(len_ref, pidx_ref,  # scalar prefetch: lengths [B], page table [B * npp]
                  q_ref, rowt_ref, k_ref, v_ref, ks_ref, vs_ref,  # q [R, Hd]; rowt [R, 1]; k/v [ps, Hd]; s [1, ps]
                  o_ref,  # [R, Hd]
                  m_sc, l_sc, acc_sc,  # VMEM [R, 1], [R, 1], [R, Hd] f32
                  *, T, npp, scale, window, quant_k, quant_v):
    b, p = pl.program_id(0), pl.program_id(2)
    R = q_ref.shape[0]
    ps = k_ref.shape[0]
    length = len_ref[b]

    @pl.when(p == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    lo, hi = _page_range(length, T, ps, window, npp)

    @pl.when((p >= lo) & (p < hi))
    def _compute():
        q = q_ref[...]
        k = k_ref[...]
        v = v_ref[...]
        if quant_k:
            k = k.astype(q.dtype)
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
        if quant_k:
            s = s * ks_ref[...].astype(jnp.float32)  # [1, ps] per-token scales of this page
        q_pos = length - T + rowt_ref[...]  # [R, 1]
        kv_pos = p * ps + lax.broadcasted_iota(jnp.int32, (R, ps), 1)
        mask = (kv_pos <= q_pos) & (kv_pos < length)
        if window is not None:
            mask = mask & (q_pos - kv_pos < window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        pr = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + pr.sum(axis=1, keepdims=True)
        if quant_v:
            pr = pr * vs_ref[...].astype(jnp.float32)
            v = v.astype(q.dtype)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(p == npp - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l > 0.0, l, 1.0)).astype(o_ref.dtype)


def paged_attention_tpu_core(q_r, k_pages, v_pages, k_scales, v_scales, lengths, page_indices, *, T, G, scale,
                             window, interpret):
    """q_r [B, K, R, Hd] (R = T*G padded to a multiple of 8); pages [K, P, ps, Hd]; scales [K, P, ps] or None;
    lengths [B]; page_indices [B, npp] -> [B, K, R, Hd]."""
    B, K, R, Hd = q_r.shape
    _, P, ps, _ = k_pages.shape
    npp = page_indices.shape[1]
    row_t = (jnp.arange(R, dtype=jnp.int32) // G)[:, None]  # query token of each row

    def page(b, h, p, lens, pidx):
        lo, hi = _page_range(lens[b], T, ps, window, npp)
        p = jnp.clip(p, lo, jnp.maximum(hi - 1, lo))  # outside [lo, hi): reuse a fetched page (no DMA)
        return pidx[b * npp + jnp.clip(p, 0, npp - 1)]

    page_spec = pl.BlockSpec((None, None, ps, Hd), lambda b, h, p, lens, pidx: (h, page(b, h, p, lens, pidx), 0, 0))
    scale_spec = pl.BlockSpec((None, None, 1, ps), lambda b, h, p, lens, pidx: (h, page(b, h, p, lens, pidx), 0, 0))
    dummy = jnp.zeros((K, P, 1, ps), jnp.float32)
    ks = dummy if k_scales is None else k_scales.astype(jnp.float32).reshape(K, P, 1, ps)
    vs = dummy if v_scales is None else v_scales.astype(jnp.float32).reshape(K, P, 1, ps)
    q_spec = pl.BlockSpec((None, None, R, Hd), lambda b, h, p, *_: (b, h, 0, 0))
    kernel = functools.partial(_paged_kernel, T=T, npp=npp, scale=scale, window=window,
                               quant_k=k_scales is not None, quant_v=v_scales is not None)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, K, npp),
            in_specs=[q_spec, pl.BlockSpec((R, 1), lambda b, h, p, *_: (0, 0)), page_spec, page_spec, scale_spec,
                      scale_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((R, 1), jnp.float32), pltpu.VMEM((R, 1), jnp.float32),
                            pltpu.VMEM((R, Hd), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q_r.shape, q_r.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxtx_paged_attention_tpu",
    )(lengths.astype(jnp.int32), page_indices.astype(jnp.int32).reshape(-1), q_r, row_t, k_pages, v_pages, ks, vs)
