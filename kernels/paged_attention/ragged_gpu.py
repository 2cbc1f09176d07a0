"""Ragged paged attention for GPU: a Pallas kernel lowered through Triton.

One program per (item, kv head): an item is up to `q_tokens` query tokens of one sequence (see `ragged_common`), its
rows the tokens x the G query heads sharing the kv head. The program walks its sequence's page table `ppb` pages per
step (a gather of [ppb, page_size, Hd]) with an online softmax, from the first page inside the sliding window to the
page of its last query's position (causal skip: a prefill item never reads the pages after its own tokens). int8
pages are dequantized in registers: K scales multiply the scores' columns, V scales the probabilities'. Slots past
the sequence's length hold another request's stale data (maybe NaN): they are masked in the scores and zeroed in V.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxtx.kernels.paged_attention.ragged_common import RaggedBlockSizes, from_items, plan_items, to_items
from jaxtx.kernels.reference import MASK_VALUE


def _ragged_kernel(q_ref, k_ref, v_ref, ks_ref, vs_ref, tbl_ref, meta_ref, o_ref, *, G, ppb, scale, window):
    # q_ref [Rq, Hd] rows t * G + g (padded); k_ref, v_ref [P, ps, Hd] this kv head's pool; ks_ref, vs_ref [P, ps] or
    # None; tbl_ref [npp] the item's sequence's page table; meta_ref [4] = (kv_len, pos0, rows, 0); o_ref [Rq, Hd]
    Rq, Hd = q_ref.shape
    ps = k_ref.shape[1]
    bk = ppb * ps
    kv_len, pos0, rows = meta_ref[0], meta_ref[1], meta_ref[2]
    q = q_ref[...]
    t = jnp.arange(Rq) // G  # query token of each row; padded rows have t >= rows
    q_pos = pos0 + t
    row_ok = t < rows

    def body(step, carry):
        m, l, acc = carry
        pages = tbl_ref[pl.ds(step * ppb, ppb)]
        k = k_ref[pages].reshape(bk, Hd)
        v = v_ref[pages].reshape(bk, Hd)
        kv_pos = step * bk + jnp.arange(bk)
        kv_ok = kv_pos < kv_len
        if ks_ref is not None:
            k = k.astype(q.dtype)
        s = plgpu.dot(q, k, trans_b=True) * scale
        if ks_ref is not None:
            s = s * ks_ref[pages].reshape(1, bk)
        mask = (kv_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :] & row_ok[:, None]
        if window is not None:
            mask = mask & (q_pos[:, None] - kv_pos[None, :] < window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=1)
        if vs_ref is not None:
            p = p * jnp.where(kv_ok, vs_ref[pages].reshape(bk), 0.0)[None, :]
            v = v.astype(q.dtype)
        v = jnp.where(kv_ok[:, None], v, jnp.zeros_like(v))
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return m_new, l, acc

    last = pos0 + rows  # one past the last query's position: no key at or beyond it is visible
    hi = jnp.where(rows > 0, pl.cdiv(jnp.minimum(last, kv_len), bk), 0)
    lo = 0 if window is None else jnp.maximum(0, pos0 - window + 1) // bk
    init = (jnp.full((Rq,), MASK_VALUE, jnp.float32), jnp.zeros((Rq,), jnp.float32), jnp.zeros((Rq, Hd), jnp.float32))
    m, l, acc = lax.fori_loop(lo, jnp.maximum(lo, hi), body, init)
    o_ref[...] = (acc / jnp.where(l > 0.0, l, 1.0)[:, None]).astype(o_ref.dtype)


def ragged_paged_attention_gpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, k_scales, v_scales,
                               window, scale, interpret, block_sizes=None):
    """Arguments as `ragged_paged_attention` (checked there; scales per token [K, P, ps] f32) -> [N, H, Hd]."""
    bs = block_sizes or RaggedBlockSizes()
    N, H, Hd = q.shape
    K, P, ps, _ = k_pages.shape
    G = H // K
    if Hd & (Hd - 1) or Hd < 16 or ps & (ps - 1):
        raise ValueError(f"ragged_paged_attention (pallas_gpu): head dim {Hd} must be a power of two >= 16 and "
                         f"page_size {ps} a power of two (Triton tiles); pages {tuple(k_pages.shape)}")
    bq = bs.q_tokens
    Rq = max(16, pl.next_power_of_2(bq * G))
    ppb = max(1, bs.kv_tokens // ps)
    npp = -(-page_table.shape[1] // ppb) * ppb
    table = jnp.pad(page_table, ((0, 0), (0, npp - page_table.shape[1])))
    plan = plan_items(N, kv_lens, table, cu_q_lens, num_seqs, bq)
    q_items = to_items(q, plan, K, bq, Rq)  # [W, K, Rq, Hd]
    W = q_items.shape[0]
    page_spec = pl.BlockSpec((None, P, ps, Hd), lambda w, h: (h, 0, 0, 0))
    scale_spec = pl.BlockSpec((None, P, ps), lambda w, h: (h, 0, 0))
    item_spec = pl.BlockSpec((None, None, Rq, Hd), lambda w, h: (w, h, 0, 0))
    kernel = functools.partial(_ragged_kernel, G=G, ppb=ppb, scale=scale, window=window)
    o_items = pl.pallas_call(
        kernel,
        grid=(W, K),
        in_specs=[item_spec, page_spec, page_spec, None if k_scales is None else scale_spec,
                  None if v_scales is None else scale_spec, pl.BlockSpec((None, npp), lambda w, h: (w, 0)),
                  pl.BlockSpec((None, 4), lambda w, h: (w, 0))],
        out_specs=item_spec,
        out_shape=jax.ShapeDtypeStruct(q_items.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxtx_ragged_paged_attention",
    )(q_items, k_pages, v_pages, k_scales, v_scales, plan.tables, plan.meta)
    return from_items(o_items, plan, N, H, bq)
