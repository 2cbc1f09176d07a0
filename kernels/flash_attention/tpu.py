"""Flash attention for TPU: Pallas Mosaic kernels (forward, dk/dv backward, dq backward).

TPU shape of the algorithm: the kv loop is the innermost *grid* axis ("arbitrary"), and the running max / sum /
accumulator live in VMEM scratch across its steps; the other grid axes are "parallel" (megacore may split them).
Layout is [B, H, T, Hd] so a tile is (block, Hd) in the (sublane, lane) dims. GQA: the K/V index maps read kv head
h // G; the dk/dv kernel's grid is (B, K, kv-block, G, q-block) and accumulates the G query heads of a group into
one dk/dv tile, so nothing is repeated or reduced afterwards.

Skipping: causal / window / segment visibility of a (q-block, kv-block) pair is decided from scalars (program ids and
per-block segment-id min/max, scalar-prefetched into SMEM). Invisible tiles are not computed (`pl.when`), and the
index maps clamp the block index into the visible range, so the pipeline does not even DMA them (an unchanged block
index is not re-fetched).

Tiling: block_q % 8 == 0 and block_k % 128 == 0 (or one block covering the padded length) when compiled for TPU;
interpret mode accepts any block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxtx.kernels.flash_attention.common import (MASK_VALUE, BlockSizes, MaskSpec, check_inputs, element_mask,
                                                  pad_axis, padded_segments, round_up)

DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_k=128)
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b


def _block_range(n_other, blk_self, blk_other, idx, spec: MaskSpec, *, self_is_q: bool):
    """[lo, hi) of the other axis's blocks visible from block idx (causal / window / kv_len); scalar arithmetic."""
    s0, s1 = idx * blk_self, idx * blk_self + blk_self - 1
    lo, hi = 0, n_other
    W = spec.window
    if self_is_q:  # other = kv blocks
        hi = jnp.minimum(hi, pl.cdiv(spec.kv_len, blk_other))
        if spec.causal:
            hi = jnp.minimum(hi, s1 // blk_other + 1)
        if W is not None:
            lo = jnp.maximum(lo, (s0 - W + 1) // blk_other)
            if not spec.causal:
                hi = jnp.minimum(hi, (s1 + W - 1) // blk_other + 1)
    else:  # self = kv block, other = q blocks
        if spec.causal:
            lo = jnp.maximum(lo, s0 // blk_other)
        if W is not None:
            hi = jnp.minimum(hi, (s1 + W - 1) // blk_other + 1)
            if not spec.causal:
                lo = jnp.maximum(lo, (s0 - W + 1) // blk_other)
    return lo, hi


def _visible(b, i, j, seg_ref, *, spec, bq, bk, nq, nk, has_seg):
    """Scalar bool: may q-block i see kv-block j in batch b? seg_ref = [qmin(B*nq), qmax, kmin(B*nk), kmax]."""
    lo, hi = _block_range(nk, bq, bk, i, spec, self_is_q=True)
    vis = (j >= lo) & (j < hi)
    if has_seg:
        qmin, qmax, kmin, kmax = seg_ref
        qi, kj = b * nq + i, b * nk + j
        vis = vis & (qmin[qi] <= kmax[kj]) & (kmin[kj] <= qmax[qi])
    return vis


def _tile(q, k, i, j, h, qseg_ref, kvseg_ref, slopes_ref, *, spec, bq, bk, has_seg, has_alibi, padded_kv):
    """Scaled, biased, masked f32 scores [bq, bk] and the mask (None when all visible)."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * spec.scale
    qi = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kj = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if has_alibi:
        s = s - slopes_ref[h] * jnp.abs(qi - kj).astype(jnp.float32)
    mask = element_mask(qi, kj, qseg_ref[...] if has_seg else None, kvseg_ref[...] if has_seg else None, spec,
                        padded_kv=padded_kv)  # segments [bq, 1] == [1, bk]
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s, mask


def _fwd_kernel(seg_min_q, seg_max_q, seg_min_k, seg_max_k, slopes_ref,  # scalar prefetch (SMEM)
                q_ref, k_ref, v_ref, qseg_ref, kvseg_ref,  # q [bq, Hd], k/v [bk, Hd], qseg [bq, 1], kvseg [1, bk]
                o_ref, lse_ref,  # o [bq, Hd], lse [bq, 1]
                m_sc, l_sc, acc_sc,  # VMEM scratch: [bq, 1], [bq, 1], [bq, Hd] f32
                *, cfg):
    spec, bq, bk, nq, nk, has_seg, has_alibi, padded_kv = cfg
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    seg = (seg_min_q, seg_max_q, seg_min_k, seg_max_k)

    @pl.when(_visible(b, i, j, seg, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk, has_seg=has_seg))
    def _compute():
        v = v_ref[...]
        s, mask = _tile(q_ref[...], k_ref[...], i, j, h, qseg_ref, kvseg_ref, slopes_ref, spec=spec, bq=bq, bk=bk,
                        has_seg=has_seg, has_alibi=has_alibi, padded_kv=padded_kv)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        nonempty = l > 0.0
        safe_l = jnp.where(nonempty, l, 1.0)
        o_ref[...] = (acc_sc[...] / safe_l).astype(o_ref.dtype)  # empty rows: acc == 0
        lse_ref[...] = jnp.where(nonempty, m_sc[...] + jnp.log(safe_l), 0.0)


def _dkdv_kernel(seg_min_q, seg_max_q, seg_min_k, seg_max_k, slopes_ref,
                 q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref,
                 # q, do [bq, Hd]; k, v [bk, Hd]; lse, delta [bq, 1]
                 dk_ref, dv_ref,  # [bk, Hd]
                 dk_sc, dv_sc,  # VMEM [bk, Hd] f32, accumulated over (g, q-block)
                 *, cfg, G):
    spec, bq, bk, nq, nk, has_seg, has_alibi, padded_kv = cfg
    b, kh, j, g, i = (pl.program_id(n) for n in range(5))

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    seg = (seg_min_q, seg_max_q, seg_min_k, seg_max_k)

    @pl.when(_visible(b, i, j, seg, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk, has_seg=has_seg))
    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, mask = _tile(q, k, i, j, kh * G + g, qseg_ref, kvseg_ref, slopes_ref, spec=spec, bq=bq, bk=bk,
                        has_seg=has_seg, has_alibi=has_alibi, padded_kv=padded_kv)
        p = jnp.exp(s - lse_ref[...])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...]) * spec.scale
        dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)

    @pl.when((g == G - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(seg_min_q, seg_max_q, seg_min_k, seg_max_k, slopes_ref,
               q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, do_ref, lse_ref, delta_ref,
               dq_ref,  # [bq, Hd]
               dq_sc,  # VMEM [bq, Hd] f32
               *, cfg):
    spec, bq, bk, nq, nk, has_seg, has_alibi, padded_kv = cfg
    b, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    seg = (seg_min_q, seg_max_q, seg_min_k, seg_max_k)

    @pl.when(_visible(b, i, j, seg, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk, has_seg=has_seg))
    def _compute():
        k, v, do = k_ref[...], v_ref[...], do_ref[...]
        s, mask = _tile(q_ref[...], k, i, j, h, qseg_ref, kvseg_ref, slopes_ref, spec=spec, bq=bq, bk=bk,
                        has_seg=has_seg, has_alibi=has_alibi, padded_kv=padded_kv)
        p = jnp.exp(s - lse_ref[...])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...]) * spec.scale
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _q_outer_specs(cfg, G, Hd):
    """Index maps for grid (B, H, nq, nk): kv block index clamped into the visible range (no DMA for skipped)."""
    spec, bq, bk, nq, nk = cfg[:5]

    def kv_j(i, j):
        lo, hi = _block_range(nk, bq, bk, i, spec, self_is_q=True)
        return jnp.clip(jnp.clip(j, lo, jnp.maximum(hi - 1, lo)), 0, nk - 1)  # nothing visible: any valid block

    q_map = lambda b, h, i, j, *_: (b, h, i, 0)  # noqa: E731
    kv_map = lambda b, h, i, j, *_: (b, h // G, kv_j(i, j), 0)  # noqa: E731
    return dict(
        q=pl.BlockSpec((None, None, bq, Hd), q_map),
        kv=pl.BlockSpec((None, None, bk, Hd), kv_map),
        qseg=pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
        kvseg=pl.BlockSpec((None, 1, bk), lambda b, h, i, j, *_: (b, 0, kv_j(i, j))),
        stat=pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0)),
    )


def _prefetch(q_seg, kv_seg, slopes, B, nq, nk, bq, bk, H):
    """Scalar-prefetch operands: per-block segment min/max (flattened [B*n]) and ALiBi slopes [H]."""
    if q_seg is None:
        dummy = jnp.zeros((1,), jnp.int32)
        seg = (dummy,) * 4
    else:
        qb, kb = q_seg.reshape(B, nq, bq), kv_seg.reshape(B, nk, bk)
        seg = (qb.min(-1).reshape(-1), qb.max(-1).reshape(-1), kb.min(-1).reshape(-1), kb.max(-1).reshape(-1))
    sl = jnp.zeros((1,), jnp.float32) if slopes is None else slopes.astype(jnp.float32)
    return (*seg, sl)


def _seg_operands(q_seg, kv_seg, B, Tp, Sp):
    if q_seg is None:  # tiny placeholders keep one kernel signature; never read (has_seg=False)
        return jnp.zeros((B, Tp, 1), jnp.int32), jnp.zeros((B, 1, Sp), jnp.int32)
    return q_seg[:, :, None], kv_seg[:, None, :]


def _fwd(q, k, v, q_seg, kv_seg, slopes, cfg, interpret):
    spec, bq, bk, nq, nk, has_seg, has_alibi, _ = cfg
    B, H, Tp, Hd = q.shape
    K, Sp = k.shape[1], k.shape[2]
    sp = _q_outer_specs(cfg, H // K, Hd)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(B, H, nq, nk),
        in_specs=[sp["q"], sp["kv"], sp["kv"], sp["qseg"], sp["kvseg"]],
        out_specs=[sp["q"], sp["stat"]],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, Hd), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="jaxtx_flash_fwd_tpu",
    )(*_prefetch(q_seg, kv_seg, slopes, B, nq, nk, bq, bk, H), q, k, v, *_seg_operands(q_seg, kv_seg, B, Tp, Sp))


def _bwd(q, k, v, q_seg, kv_seg, slopes, o, lse, do, cfg, interpret):
    spec, bq, bk, nq, nk = cfg[:5]
    B, H, Tp, Hd = q.shape
    K, Sp = k.shape[1], k.shape[2]
    G = H // K
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, Tp, 1]
    prefetch = _prefetch(q_seg, kv_seg, slopes, B, nq, nk, bq, bk, H)
    segs = _seg_operands(q_seg, kv_seg, B, Tp, Sp)

    # dk/dv: grid (B, K, nk, G, nq); the q block index is clamped into the range that sees kv block j.
    def q_i(j, i):
        lo, hi = _block_range(nq, bk, bq, j, spec, self_is_q=False)
        return jnp.clip(jnp.clip(i, lo, jnp.maximum(hi - 1, lo)), 0, nq - 1)

    q_spec = pl.BlockSpec((None, None, bq, Hd), lambda b, kh, j, g, i, *_: (b, kh * G + g, q_i(j, i), 0))
    stat_spec = pl.BlockSpec((None, None, bq, 1), lambda b, kh, j, g, i, *_: (b, kh * G + g, q_i(j, i), 0))
    kv_spec = pl.BlockSpec((None, None, bk, Hd), lambda b, kh, j, g, i, *_: (b, kh, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, G=G),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(B, K, nk, G, nq),
            in_specs=[q_spec, kv_spec, kv_spec,
                      pl.BlockSpec((None, bq, 1), lambda b, kh, j, g, i, *_: (b, q_i(j, i), 0)),
                      pl.BlockSpec((None, 1, bk), lambda b, kh, j, g, i, *_: (b, 0, j)),
                      q_spec, stat_spec, stat_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, Hd), jnp.float32), pltpu.VMEM((bk, Hd), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="jaxtx_flash_bwd_dkdv_tpu",
    )(*prefetch, q, k, v, *segs, do, lse, delta)

    sp = _q_outer_specs(cfg, G, Hd)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(B, H, nq, nk),
            in_specs=[sp["q"], sp["kv"], sp["kv"], sp["qseg"], sp["kvseg"], sp["q"], sp["stat"], sp["stat"]],
            out_specs=sp["q"],
            scratch_shapes=[pltpu.VMEM((bq, Hd), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="jaxtx_flash_bwd_dq_tpu",
    )(*prefetch, q, k, v, *segs, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, q_seg, kv_seg, slopes, cfg, interpret):
    return _fwd(q, k, v, q_seg, kv_seg, slopes, cfg, interpret)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, slopes, cfg, interpret):
    o, lse = _fwd(q, k, v, q_seg, kv_seg, slopes, cfg, interpret)
    return o, (q, k, v, q_seg, kv_seg, slopes, o, lse)


def _flash_bwd(cfg, interpret, res, do):
    q, k, v, q_seg, kv_seg, slopes, o, lse = res
    dq, dk, dv = _bwd(q, k, v, q_seg, kv_seg, slopes, o, lse, do, cfg, interpret)
    return dq, dk, dv, None, None, None if slopes is None else jnp.zeros_like(slopes)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                        alibi_slopes=None, softmax_scale=None, block_sizes: BlockSizes | None = None,
                        interpret=False):
    """q [B, T, H, Hd], k/v [B, S, K, Hd] -> [B, T, H, Hd] (q.dtype). Pallas Mosaic.

    interpret=True runs the TPU interpreter on CPU (`pltpu.force_tpu_interpret_mode()` does so for interpret=False).
    The backward uses the forward's block sizes (block_q_bwd / block_k_bwd must be unset or equal).
    """
    B, T, H, Hd, S, K = check_inputs("flash_attention_tpu", q, k, v, window=window, segment_ids=segment_ids,
                                     kv_segment_ids=kv_segment_ids, alibi_slopes=alibi_slopes)
    bs = DEFAULT_BLOCK_SIZES if block_sizes is None else block_sizes
    if bs.bwd_q != bs.block_q or bs.bwd_k != bs.block_k:
        raise ValueError(f"flash_attention_tpu: separate backward block sizes are not supported ({bs})")
    # 16 rows: a bf16 tile packs two rows per sublane, so short sequences round to 16, not 8.
    bq, bk = min(bs.block_q, round_up(T, 16)), min(bs.block_k, round_up(S, 16))
    Tp, Sp = round_up(T, bq), round_up(S, bk)
    if not interpret and jax.default_backend() == "tpu":  # (CPU interpreters accept any tile)
        if bq % 8:
            raise ValueError(f"flash_attention_tpu: block_q={bq} must be a multiple of 8 (TPU sublanes)")
        if bk % 128 and bk != Sp:
            raise ValueError(f"flash_attention_tpu: block_k={bk} must be a multiple of 128 (TPU lanes) "
                             f"or cover the whole padded S={Sp}")
    scale = float(Hd ** -0.5 if softmax_scale is None else softmax_scale)
    spec = MaskSpec(causal=bool(causal), window=window, kv_len=S, scale=scale)
    q_seg, kv_seg = padded_segments(segment_ids, kv_segment_ids, B, T, Tp, Sp)
    cfg = (spec, bq, bk, Tp // bq, Sp // bk, q_seg is not None, alibi_slopes is not None, Sp != S)
    # [B, T, H, Hd] -> [B, H, T, Hd]: tiles are (sequence, head-dim) = (sublane, lane) on the TPU.
    qt = pad_axis(q, 1, Tp).transpose(0, 2, 1, 3)
    kt = pad_axis(k, 1, Sp).transpose(0, 2, 1, 3)
    vt = pad_axis(v, 1, Sp).transpose(0, 2, 1, 3)
    o = _flash(qt, kt, vt, q_seg, kv_seg, alibi_slopes, cfg, pltpu.InterpretParams() if interpret else False)
    return o.transpose(0, 2, 1, 3)[:, :T]

