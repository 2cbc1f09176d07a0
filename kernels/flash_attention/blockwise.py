"""Flash attention in pure JAX (`lax` loops): the exact online-softmax algorithm, for CPU and long sequences.

Same algorithm as the Pallas bodies: the forward loops q-blocks (outer) x kv-blocks (inner), keeping a running max m,
sum l and accumulator per query row, so the [T, S] score matrix never exists; only a [bq, bk] tile per (B, H) does.
The backward (custom_vjp) recomputes each tile from the saved logsumexp: one pass with kv-blocks outer, accumulating
dk/dv per kv-block and dq into an O(T) buffer. Temp memory is therefore O(T + bq*bk), not O(T*S).

Fully masked tiles are skipped: the inner loop runs only over the [lo, hi) range of visible blocks (causal, window)
and a `lax.cond` skips invisible tiles inside it (segments). This is the only body that takes an additive `bias`
(T5 relative positions), with its gradient.

Shapes: q [B, T, H, Hd], k/v [B, S, K, Hd]; inside, q is viewed as [B, T, K, G, Hd] (GQA without repeating K/V).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxtx.kernels.flash_attention.common import (MASK_VALUE, BlockSizes, MaskSpec, alibi_block, block_visibility,
                                                  check_inputs, element_mask, pad_axis, padded_segments, round_up)

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=512, block_k=512)


def _visible_range(vis_row):
    """First and one-past-last True index of a bool vector (lo == hi when none)."""
    n = vis_row.shape[0]
    any_ = vis_row.any()
    lo = jnp.argmax(vis_row)
    hi = n - jnp.argmax(vis_row[::-1])
    return jnp.where(any_, lo, 0), jnp.where(any_, hi, 0)


def _tile_scores(q_BtKGh, k_BsKh, i0, j0, q_seg, kv_seg, slopes_KG11, bias, spec: MaskSpec, padded_kv):
    """Scaled, biased, masked scores of one tile -> (s [B, K, G, bq, bk] f32, mask broadcastable or None)."""
    bq, bk = q_BtKGh.shape[1], k_BsKh.shape[1]
    K, G = q_BtKGh.shape[2], q_BtKGh.shape[3]
    s = jnp.einsum("BtKGh,BsKh->BKGts", q_BtKGh, k_BsKh, preferred_element_type=jnp.float32) * spec.scale
    q_idx = i0 + jnp.arange(bq)
    k_idx = j0 + jnp.arange(bk)
    if bias is not None:
        bb = lax.dynamic_slice(bias, (0, 0, i0, j0), (bias.shape[0], bias.shape[1], bq, bk)).astype(jnp.float32)
        s = s + (bb.reshape(bb.shape[0], K, G, bq, bk) if bb.shape[1] == K * G else bb[:, :, None])
    if slopes_KG11 is not None:
        s = s + alibi_block(slopes_KG11, q_idx, k_idx)
    qs = None if q_seg is None else lax.dynamic_slice_in_dim(q_seg, i0, bq, axis=1)
    ks = None if kv_seg is None else lax.dynamic_slice_in_dim(kv_seg, j0, bk, axis=1)
    mask = element_mask(q_idx, k_idx, qs, ks, spec, padded_kv=padded_kv)
    if mask is not None:
        if mask.ndim == 3:
            mask = mask[:, None, None]
        s = jnp.where(mask, s, MASK_VALUE)
    return s, mask


def _fwd(q, k, v, q_seg, kv_seg, slopes, bias, spec: MaskSpec, bq: int, bk: int):
    """Padded inputs (Tp % bq == 0, Sp % bk == 0) -> (o [B, Tp, H, Hd] q.dtype, lse [B, K, G, Tp] f32)."""
    B, Tp, H, Hd = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = H // K
    nq, nk = Tp // bq, Sp // bk
    padded_kv = Sp != spec.kv_len
    q5 = q.reshape(B, Tp, K, G, Hd)
    slopes_KG11 = None if slopes is None else slopes.astype(jnp.float32).reshape(K, G, 1, 1)
    vis = block_visibility(nq, bq, nk, bk, q_seg, kv_seg, spec).any(0)  # [nq, nk]

    def q_block(i, carry):
        o_all, lse_all = carry
        qb = lax.dynamic_slice_in_dim(q5, i * bq, bq, axis=1)

        def kv_block(j, c):
            def compute(c):
                m, l, acc = c
                kb = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
                vb = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
                s, mask = _tile_scores(qb, kb, i * bq, j * bk, q_seg, kv_seg, slopes_KG11, bias, spec, padded_kv)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                alpha = jnp.exp(m - m_new)
                l = alpha * l + p.sum(-1)
                pv = jnp.einsum("BKGts,BsKh->BKGth", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv
            return lax.cond(vis[i, j], compute, lambda c: c, c)

        init = (jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, Hd), jnp.float32))
        lo, hi = _visible_range(vis[i])
        m, l, acc = lax.fori_loop(lo, hi, kv_block, init)
        nonempty = l > 0.0
        o = acc / jnp.where(nonempty, l, 1.0)[..., None]  # empty rows: acc == 0 -> o == 0
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), 0.0)
        o = o.transpose(0, 3, 1, 2, 4).reshape(B, bq, H, Hd).astype(q.dtype)
        o_all = lax.dynamic_update_slice_in_dim(o_all, o, i * bq, axis=1)
        lse_all = lax.dynamic_update_slice_in_dim(lse_all, lse, i * bq, axis=3)
        return o_all, lse_all

    init = (jnp.zeros((B, Tp, H, Hd), q.dtype), jnp.zeros((B, K, G, Tp), jnp.float32))
    return lax.fori_loop(0, nq, q_block, init)


def _bwd(q, k, v, q_seg, kv_seg, slopes, bias, o, lse, do, spec: MaskSpec, bq: int, bk: int):
    B, Tp, H, Hd = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = H // K
    nq, nk = Tp // bq, Sp // bk
    padded_kv = Sp != spec.kv_len
    q5 = q.reshape(B, Tp, K, G, Hd)
    do5 = do.reshape(B, Tp, K, G, Hd)
    slopes_KG11 = None if slopes is None else slopes.astype(jnp.float32).reshape(K, G, 1, 1)
    # delta_i = sum_d o_id * do_id = sum_j p_ij dp_ij: the softmax-backward row term, O(T).
    delta = jnp.einsum("BTKGh,BTKGh->BKGT", o.reshape(B, Tp, K, G, Hd).astype(jnp.float32),
                       do5.astype(jnp.float32))
    vis = block_visibility(nq, bq, nk, bk, q_seg, kv_seg, spec).any(0)  # [nq, nk]

    def kv_block(j, carry):
        dq, dk_all, dv_all, dbias = carry
        kb = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        vb = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)

        def q_block(i, c):
            def compute(c):
                dq, dk, dv, dbias = c
                qb = lax.dynamic_slice_in_dim(q5, i * bq, bq, axis=1)
                dob = lax.dynamic_slice_in_dim(do5, i * bq, bq, axis=1)
                lseb = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
                deltab = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
                s, mask = _tile_scores(qb, kb, i * bq, j * bk, q_seg, kv_seg, slopes_KG11, bias, spec, padded_kv)
                p = jnp.exp(s - lseb[..., None])
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                dv = dv + jnp.einsum("BKGts,BtKGh->BsKh", p.astype(do.dtype), dob,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("BtKGh,BsKh->BKGts", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - deltab[..., None])  # d loss / d (scaled, biased scores)
                if dbias is not None:
                    db = ds.reshape(B, H, bq, bk)
                    if dbias.shape[0] == 1:
                        db = db.sum(0, keepdims=True)
                    if dbias.shape[1] == 1:
                        db = db.sum(1, keepdims=True)
                    dbias = lax.dynamic_update_slice(dbias, db, (0, 0, i * bq, j * bk))
                ds = ds * spec.scale
                dqb = jnp.einsum("BKGts,BsKh->BtKGh", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
                dq = lax.dynamic_update_slice_in_dim(
                    dq, lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dqb, i * bq, axis=1)
                dk = dk + jnp.einsum("BKGts,BtKGh->BsKh", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32)
                return dq, dk, dv, dbias
            return lax.cond(vis[i, j], compute, lambda c: c, c)

        zeros = jnp.zeros((B, bk, K, Hd), jnp.float32)
        lo, hi = _visible_range(vis[:, j])
        dq, dk, dv, dbias = lax.fori_loop(lo, hi, q_block, (dq, zeros, zeros, dbias))
        dk_all = lax.dynamic_update_slice_in_dim(dk_all, dk.astype(k.dtype), j * bk, axis=1)
        dv_all = lax.dynamic_update_slice_in_dim(dv_all, dv.astype(v.dtype), j * bk, axis=1)
        return dq, dk_all, dv_all, dbias

    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    init = (jnp.zeros((B, Tp, K, G, Hd), jnp.float32), jnp.zeros_like(k), jnp.zeros_like(v), dbias0)
    dq, dk, dv, dbias = lax.fori_loop(0, nk, kv_block, init)
    dq = dq.reshape(B, Tp, H, Hd).astype(q.dtype)
    if dbias is not None:
        dbias = dbias.astype(bias.dtype)
    return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_seg, kv_seg, slopes, bias, spec, bq, bk):
    return _fwd(q, k, v, q_seg, kv_seg, slopes, bias, spec, bq, bk)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, slopes, bias, spec, bq, bk):
    o, lse = _fwd(q, k, v, q_seg, kv_seg, slopes, bias, spec, bq, bk)
    return o, (q, k, v, q_seg, kv_seg, slopes, bias, o, lse)


def _flash_bwd(spec, bq, bk, res, do):
    q, k, v, q_seg, kv_seg, slopes, bias, o, lse = res
    dq, dk, dv, dbias = _bwd(q, k, v, q_seg, kv_seg, slopes, bias, o, lse, do, spec, bq, bk)
    # Segment ids are integer inputs and ALiBi slopes are constants: no cotangent.
    dslopes = None if slopes is None else jnp.zeros_like(slopes)
    return dq, dk, dv, None, None, dslopes, dbias


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                        alibi_slopes=None, bias=None, softmax_scale=None, block_sizes: BlockSizes | None = None):
    """q [B, T, H, Hd], k/v [B, S, K, Hd] -> [B, T, H, Hd] in q.dtype. Exact; O(T) memory (plus bias if given).

    Differentiable in q, k, v and bias. T and S need not be multiples of the block sizes (inputs are padded).
    """
    B, T, H, Hd, S, K = check_inputs("blockwise_attention", q, k, v, window=window, segment_ids=segment_ids,
                                     kv_segment_ids=kv_segment_ids, alibi_slopes=alibi_slopes, bias=bias)
    bs = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
    if bs.bwd_q != bs.block_q or bs.bwd_k != bs.block_k:
        raise ValueError(f"blockwise_attention: separate backward block sizes are not supported ({bs})")
    bq, bk = min(bs.block_q, round_up(T, 8)), min(bs.block_k, round_up(S, 8))
    Tp, Sp = round_up(T, bq), round_up(S, bk)
    scale = float(Hd ** -0.5 if softmax_scale is None else softmax_scale)
    spec = MaskSpec(causal=bool(causal), window=window, kv_len=S, scale=scale)
    q_seg, kv_seg = padded_segments(segment_ids, kv_segment_ids, B, T, Tp, Sp)
    if bias is not None:
        bias = pad_axis(pad_axis(bias, 2, Tp), 3, Sp)
    o = _flash(pad_axis(q, 1, Tp), pad_axis(k, 1, Sp), pad_axis(v, 1, Sp), q_seg, kv_seg, alibi_slopes, bias,
               spec, bq, bk)
    return o[:, :T]
