"""Ragged paged attention for TPU: a Pallas Mosaic kernel whose K/V index maps read the items' page tables.

Grid (W items, K kv heads, pages_per_seq). An item is up to `q_tokens` query tokens of one sequence (see
`ragged_common`); its rows are the tokens x the G query heads of one kv head. The page tables and item metadata
(kv_len, first query position, live rows) are scalar-prefetched into SMEM, so the BlockSpec index map of K/V returns
the physical page and the pipeline DMAs exactly one [page_size, Hd] page per step; pages outside the item's range
(past its last query's position: the causal skip, or before the sliding window) map to an already-fetched page (no
DMA) and `pl.when` skips their compute. Running max / sum / accumulator live in VMEM scratch across the page axis
("arbitrary"). int8 pages are dequantized in VMEM; slots past the sequence's length (stale, maybe NaN) are masked in
the scores and zeroed in V.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxtx.kernels.paged_attention.ragged_common import RaggedBlockSizes, from_items, plan_items, to_items
from jaxtx.kernels.reference import MASK_VALUE

_NT = (((1,), (1,)), ((), ()))


def _page_range(kv_len, pos0, rows, ps, window, npp):
    """[lo, hi) pages holding a key visible to some live row of the item."""
    hi = jnp.where(rows > 0, jnp.minimum(pl.cdiv(jnp.minimum(pos0 + rows, kv_len), ps), npp), 0)
    lo = 0 if window is None else jnp.maximum(0, pos0 - window + 1) // ps
    return lo, hi


def _ragged_kernel(tbl_ref, meta_ref,  # scalar prefetch: page tables [W * npp], meta [W * 4]
                   q_ref, rowt_ref, k_ref, v_ref, ks_ref, vs_ref,  # q [Rq, Hd]; rowt [Rq, 1]; k/v [ps, Hd]; s [1, ps]
                   o_ref,  # [Rq, Hd]
                   m_sc, l_sc, acc_sc,  # VMEM [Rq, 1], [Rq, 1], [Rq, Hd] f32
                   *, npp, scale, window, quant_k, quant_v):
    w, p = pl.program_id(0), pl.program_id(2)
    Rq = q_ref.shape[0]
    ps = k_ref.shape[0]
    kv_len, pos0, rows = meta_ref[4 * w], meta_ref[4 * w + 1], meta_ref[4 * w + 2]

    @pl.when(p == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    lo, hi = _page_range(kv_len, pos0, rows, ps, window, npp)

    @pl.when((p >= lo) & (p < hi))
    def _compute():
        q = q_ref[...]
        k = k_ref[...]
        v = v_ref[...]
        if quant_k:
            k = k.astype(q.dtype)
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale  # [Rq, ps]
        if quant_k:
            s = s * ks_ref[...]  # [1, ps] per-token scales of this page
        t = rowt_ref[...]  # [Rq, 1] query token of each row
        q_pos = pos0 + t
        kv_pos = p * ps + lax.broadcasted_iota(jnp.int32, (Rq, ps), 1)
        mask = (kv_pos <= q_pos) & (kv_pos < kv_len) & (t < rows)
        if window is not None:
            mask = mask & (q_pos - kv_pos < window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        pr = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + pr.sum(axis=1, keepdims=True)
        kv_ok = p * ps + lax.broadcasted_iota(jnp.int32, (ps, 1), 0) < kv_len  # [ps, 1]
        if quant_v:
            pr = pr * jnp.where(kv_pos[:1] < kv_len, vs_ref[...], 0.0)
            v = v.astype(q.dtype)
        v = jnp.where(kv_ok, v, jnp.zeros_like(v))
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(pr.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(p == npp - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l > 0.0, l, 1.0)).astype(o_ref.dtype)


def ragged_paged_attention_tpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, k_scales, v_scales,
                               window, scale, interpret, block_sizes=None):
    """Arguments as `ragged_paged_attention` (checked there; scales per token [K, P, ps] f32) -> [N, H, Hd]."""
    bs = block_sizes or RaggedBlockSizes()
    N, H, Hd = q.shape
    K, P, ps, _ = k_pages.shape
    G = H // K
    npp = page_table.shape[1]
    bq = bs.q_tokens
    Rq = -(-bq * G // 8) * 8  # sublane multiple
    plan = plan_items(N, kv_lens, page_table, cu_q_lens, num_seqs, bq)
    q_items = to_items(q, plan, K, bq, Rq)  # [W, K, Rq, Hd]
    W = q_items.shape[0]
    row_t = (jnp.arange(Rq, dtype=jnp.int32) // G)[:, None]

    def page(w, p, tbl, meta):
        lo, hi = _page_range(meta[4 * w], meta[4 * w + 1], meta[4 * w + 2], ps, window, npp)
        p = jnp.clip(p, lo, jnp.maximum(hi - 1, lo))  # outside [lo, hi): reuse a fetched page (no DMA)
        return tbl[w * npp + jnp.clip(p, 0, npp - 1)]

    page_spec = pl.BlockSpec((None, None, ps, Hd), lambda w, h, p, tbl, meta: (h, page(w, p, tbl, meta), 0, 0))
    scale_spec = pl.BlockSpec((None, None, 1, ps), lambda w, h, p, tbl, meta: (h, page(w, p, tbl, meta), 0, 0))
    dummy = jnp.zeros((K, P, 1, ps), jnp.float32)
    ks = dummy if k_scales is None else k_scales.reshape(K, P, 1, ps)
    vs = dummy if v_scales is None else v_scales.reshape(K, P, 1, ps)
    q_spec = pl.BlockSpec((None, None, Rq, Hd), lambda w, h, p, *_: (w, h, 0, 0))
    kernel = functools.partial(_ragged_kernel, npp=npp, scale=scale, window=window,
                               quant_k=k_scales is not None, quant_v=v_scales is not None)
    o_items = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(W, K, npp),
            in_specs=[q_spec, pl.BlockSpec((Rq, 1), lambda w, h, p, *_: (0, 0)), page_spec, page_spec, scale_spec,
                      scale_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((Rq, 1), jnp.float32), pltpu.VMEM((Rq, 1), jnp.float32),
                            pltpu.VMEM((Rq, Hd), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q_items.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxtx_ragged_paged_attention_tpu",
    )(plan.tables.reshape(-1), plan.meta.reshape(-1), q_items, row_t, k_pages, v_pages, ks, vs)
    return from_items(o_items, plan, N, H, bq)
