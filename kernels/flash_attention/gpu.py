"""Flash attention for GPU: Pallas kernels lowered through Triton (forward, dk/dv backward, dq backward).

One program per (q-block, batch, query head) in the forward and dq kernels, per (kv-block, batch, query head) in the
dk/dv kernel. K/V are indexed by kv head h // G in the BlockSpec index maps, so GQA never repeats K/V in memory. The
kv loop runs only over blocks that can be visible (causal / window bounds computed from the program id); blocks whose
segment-id ranges do not overlap are skipped with `lax.cond`. The backward recomputes each tile from the forward's
logsumexp (O(T) residuals). dk/dv are produced per query head in f32 and summed over the G heads of a group after
the kernel (O(S * H * Hd) extra, linear in S).

Triton needs power-of-two tiles: the wrapper pads Hd to a power of two >= 16 and T, S to block multiples; padded keys
are masked by index, padded query rows are dropped.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxtx.kernels.flash_attention.common import (MASK_VALUE, BlockSizes, MaskSpec, alibi_block, check_inputs,
                                                  element_mask, pad_axis, padded_segments, round_up)

# Measured on an H100 (B=2 H=16 Hd=128 bf16 causal, tools/gpu_check.py, see _launch): backward blocks 64x64 run
# 1.8x faster than 32x32 (fwd+bwd 7.0 vs 12.6 ms at T=8192); forward 128x128 is the fastest tile there.
# Tiles wider than 128 two-byte elements per row (Hd > 128, or float32 inputs) keep the 64x64 forward tile: a 128x128
# float32 tile at Hd 128 asked for 384 KiB of shared memory, over the H100's 227 KiB.
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=64)
WIDE_ROW_BLOCK_SIZES = BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64)


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, x) - 1).bit_length())


def _kv_range(i, bq, bk, nk, spec: MaskSpec):
    """[lo, hi) of kv blocks that query block i can see (causal / window / kv_len bounds; segments checked later)."""
    hi = min(nk, pl.cdiv(spec.kv_len, bk))
    qs, qe = i * bq, i * bq + bq - 1
    lo = 0
    if spec.causal:
        hi = jnp.minimum(hi, qe // bk + 1)
    if spec.window is not None:
        lo = jnp.maximum(0, (qs - spec.window + 1) // bk)
        if not spec.causal:
            hi = jnp.minimum(hi, (qe + spec.window - 1) // bk + 1)
    return lo, hi


def _unmasked_end(i, bq, bk, lo, hi, spec: MaskSpec, padded_kv: bool):
    """End of the kv blocks [lo, mid) that query block i sees entirely, so they need no position mask: for causal,
    the blocks left of the diagonal ((j + 1) * bk - 1 <= i * bq); without a window only (the window's lower edge cuts
    blocks too). The per-element iota compares and selects of the diagonal blocks are then paid only there."""
    if spec.window is not None:
        return lo
    mid = hi
    if spec.causal:
        mid = jnp.minimum(mid, (i * bq + 1) // bk)
    if padded_kv:
        mid = jnp.minimum(mid, spec.kv_len // bk)
    return jnp.maximum(lo, mid)


def _masked_q_end(j, bq, bk, lo, hi, spec: MaskSpec, padded_kv: bool):
    """The dk/dv loop's split: q blocks [lo, end) of kv block j need the position mask, [end, hi) see the whole
    block (causal: rows i * bq >= j * bk + bk - 1; a kv block holding padding is masked throughout)."""
    if spec.window is not None:
        return hi
    end = lo
    if spec.causal:
        end = jnp.maximum(end, (j * bk + bk - 1 + bq - 1) // bq)
    if padded_kv:
        end = jnp.where((j + 1) * bk > spec.kv_len, hi, end)
    return jnp.minimum(end, hi)


def _q_range(j, bq, bk, nq, spec: MaskSpec):
    """[lo, hi) of q blocks that can see kv block j."""
    ks, ke = j * bk, j * bk + bk - 1
    lo, hi = 0, nq
    if spec.causal:
        lo = ks // bq
    if spec.window is not None:
        hi = jnp.minimum(nq, (ke + spec.window - 1) // bq + 1)
        if not spec.causal:
            lo = jnp.maximum(lo, (ks - spec.window + 1) // bq)
    return lo, hi


def _scores(q, k, q_idx, k_idx, qseg, kvseg, slope, spec: MaskSpec, padded_kv: bool, precision):
    """Masked, scaled f32 scores [bq, bk] and the mask (or None)."""
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * spec.scale
    if slope is not None:
        s = s + alibi_block(slope, q_idx, k_idx)
    mask = element_mask(q_idx, k_idx, qseg, kvseg, spec, padded_kv=padded_kv)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s, mask


def _no_position_mask(spec: MaskSpec) -> MaskSpec:
    return dataclasses.replace(spec, causal=False, window=None)


def _maybe_skip(qseg, kvseg, compute, carry):
    """Skip a tile whose segment-id ranges do not overlap (exact: no equal ids possible)."""
    if qseg is None:
        return compute(carry)
    overlap = (qseg.min() <= kvseg.max()) & (kvseg.min() <= qseg.max())
    return lax.cond(overlap, compute, lambda c: c, carry)


def _slope(slopes_ref, h):
    if slopes_ref is None:
        return None
    slopes = slopes_ref[...]
    return jnp.sum(jnp.where(jnp.arange(slopes.shape[0]) == h, slopes, 0.0))


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slopes_ref, o_ref, lse_ref, *, spec, bq, bk, nk,
                padded_kv, precision):
    # q_ref [bq, Hdp]; k_ref, v_ref [Sp, Hdp]; qseg_ref [bq]; kvseg_ref [Sp]; slopes_ref [Hp]
    # o_ref [bq, Hdp]; lse_ref [bq]
    i, h = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]
    q_idx = i * bq + jnp.arange(bq)
    qseg = None if qseg_ref is None else qseg_ref[...]
    slope = _slope(slopes_ref, h)

    def body(j, carry, spec, padded_kv):
        def compute(carry):
            m, l, acc = carry
            kslice = pl.ds(j * bk, bk)
            k, v = k_ref[kslice, :], v_ref[kslice, :]
            kvseg = None if kvseg_ref is None else kvseg_ref[kslice]
            s, mask = _scores(q, k, q_idx, j * bk + jnp.arange(bk), qseg, kvseg, slope, spec, padded_kv, precision)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp(s - m_new[:, None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m - m_new)
            acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
            return m_new, alpha * l + p.sum(axis=1), acc
        kvseg_blk = None if kvseg_ref is None else kvseg_ref[pl.ds(j * bk, bk)]
        return _maybe_skip(qseg, kvseg_blk, compute, carry)

    lo, hi = _kv_range(i, bq, bk, nk, spec)
    mid = _unmasked_end(i, bq, bk, lo, hi, spec, padded_kv)
    init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros(o_ref.shape, jnp.float32))
    carry = lax.fori_loop(lo, mid, functools.partial(body, spec=_no_position_mask(spec), padded_kv=False), init)
    m, l, acc = lax.fori_loop(mid, hi, functools.partial(body, spec=spec, padded_kv=padded_kv), carry)
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)  # empty rows: acc == 0
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slopes_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 *, spec, bq, bk, nq, padded_kv, precision):
    # q_ref, do_ref [Tp, Hdp]; k_ref, v_ref [bk, Hdp]; qseg_ref [Tp]; kvseg_ref [bk]; lse_ref, delta_ref [Tp]
    # dk_ref, dv_ref [bk, Hdp] (f32, per query head)
    j, h = pl.program_id(0), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_idx = j * bk + jnp.arange(bk)
    kvseg = None if kvseg_ref is None else kvseg_ref[...]
    slope = _slope(slopes_ref, h)

    def body(i, carry, spec, padded_kv):
        def compute(carry):
            dk, dv = carry
            qslice = pl.ds(i * bq, bq)
            q, do = q_ref[qslice, :], do_ref[qslice, :]
            qseg = None if qseg_ref is None else qseg_ref[qslice]
            s, mask = _scores(q, k, i * bq + jnp.arange(bq), k_idx, qseg, kvseg, slope, spec, padded_kv, precision)
            p = jnp.exp(s - lse_ref[qslice][:, None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
            dp = plgpu.dot(do, v, trans_b=True, precision=precision)
            ds = p * (dp - delta_ref[qslice][:, None]) * spec.scale
            dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
            return dk, dv
        qseg_blk = None if qseg_ref is None else qseg_ref[pl.ds(i * bq, bq)]
        return _maybe_skip(qseg_blk, kvseg, compute, carry)

    lo, hi = _q_range(j, bq, bk, nq, spec)
    end = _masked_q_end(j, bq, bk, lo, hi, spec, padded_kv)
    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    carry = lax.fori_loop(lo, end, functools.partial(body, spec=spec, padded_kv=padded_kv), (zeros, zeros))
    dk, dv = lax.fori_loop(end, hi, functools.partial(body, spec=_no_position_mask(spec), padded_kv=False), carry)
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, slopes_ref, do_ref, lse_ref, delta_ref, dq_ref, *, spec, bq,
               bk, nk, padded_kv, precision):
    # q_ref, do_ref [bq, Hdp]; k_ref, v_ref [Sp, Hdp]; lse_ref, delta_ref [bq]; dq_ref [bq, Hdp]
    i, h = pl.program_id(0), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    q_idx = i * bq + jnp.arange(bq)
    qseg = None if qseg_ref is None else qseg_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    slope = _slope(slopes_ref, h)

    def body(j, dq, spec, padded_kv):
        def compute(dq):
            kslice = pl.ds(j * bk, bk)
            k, v = k_ref[kslice, :], v_ref[kslice, :]
            kvseg = None if kvseg_ref is None else kvseg_ref[kslice]
            s, mask = _scores(q, k, q_idx, j * bk + jnp.arange(bk), qseg, kvseg, slope, spec, padded_kv, precision)
            p = jnp.exp(s - lse[:, None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dp = plgpu.dot(do, v, trans_b=True, precision=precision)
            ds = p * (dp - delta[:, None]) * spec.scale
            return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)
        kvseg_blk = None if kvseg_ref is None else kvseg_ref[pl.ds(j * bk, bk)]
        return _maybe_skip(qseg, kvseg_blk, compute, dq)

    lo, hi = _kv_range(i, bq, bk, nk, spec)
    mid = _unmasked_end(i, bq, bk, lo, hi, spec, padded_kv)
    dq = lax.fori_loop(lo, mid, functools.partial(body, spec=_no_position_mask(spec), padded_kv=False),
                       jnp.zeros(dq_ref.shape, jnp.float32))
    dq = lax.fori_loop(mid, hi, functools.partial(body, spec=spec, padded_kv=padded_kv), dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(B, H, G, Tp, Sp, Hdp, blk_t, blk_s, q_seg, slopes, *, q_blocked: bool):
    """BlockSpecs for (q, k, v, qseg, kvseg, slopes) with grid (n, B, H): q side blocked (q_blocked) or kv side."""
    if q_blocked:
        q_spec = pl.BlockSpec((None, blk_t, None, Hdp), lambda n, b, h: (b, n, h, 0))
        kv_spec = pl.BlockSpec((None, Sp, None, Hdp), lambda n, b, h: (b, 0, h // G, 0))
        qseg_spec = pl.BlockSpec((None, blk_t), lambda n, b, h: (b, n))
        kvseg_spec = pl.BlockSpec((None, Sp), lambda n, b, h: (b, 0))
    else:
        q_spec = pl.BlockSpec((None, Tp, None, Hdp), lambda n, b, h: (b, 0, h, 0))
        kv_spec = pl.BlockSpec((None, blk_s, None, Hdp), lambda n, b, h: (b, n, h // G, 0))
        qseg_spec = pl.BlockSpec((None, Tp), lambda n, b, h: (b, 0))
        kvseg_spec = pl.BlockSpec((None, blk_s), lambda n, b, h: (b, n))
    seg = (None, None) if q_seg is None else (qseg_spec, kvseg_spec)
    slopes_spec = None if slopes is None else pl.BlockSpec((slopes.shape[0],), lambda n, b, h: (0,))
    return [q_spec, kv_spec, kv_spec, *seg, slopes_spec]


def _precision(dtype):
    # f32 inputs: no TF32 rounding, the kernel is exact like the reference. bf16/f16: native tensor-core dots.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _launch(blk_a, blk_b):
    """Triton launch parameters for a [blk_a, blk_b] tile. From the H100 sweep in tools/gpu_check.py (T=8192, Hd=128,
    bf16, causal): forward 128x128 with 8 warps and 3 stages 1.88 ms vs 64x64 / 4 warps / 2 stages 2.30 ms; backward
    64x64 with 4 warps and 2 stages 7.0 ms (fwd+bwd), vs 8.5 ms with 3 stages and 13.5 ms with 8 warps."""
    if blk_a * blk_b >= 128 * 128:
        return plgpu.CompilerParams(num_warps=8, num_stages=3)
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _fwd(q, k, v, q_seg, kv_seg, slopes, cfg):
    spec, bq, bk, _, _, interpret = cfg
    B, Tp, H, Hdp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    nq, nk = Tp // bq, Sp // bk
    kernel = functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, nk=nk, padded_kv=Sp != spec.kv_len,
                               precision=_precision(q.dtype))
    return pl.pallas_call(
        kernel,
        grid=(nq, B, H),
        in_specs=_specs(B, H, H // K, Tp, Sp, Hdp, bq, bk, q_seg, slopes, q_blocked=True),
        out_specs=[pl.BlockSpec((None, bq, None, Hdp), lambda n, b, h: (b, n, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda n, b, h: (b, h, n))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        compiler_params=_launch(bq, bk),
        interpret=interpret,
        name="jaxtx_flash_fwd",
    )(q, k, v, q_seg, kv_seg, slopes)


def _bwd(q, k, v, q_seg, kv_seg, slopes, o, lse, do, cfg):
    spec, _, _, bq, bk, interpret = cfg
    B, Tp, H, Hdp = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = H // K
    nq, nk = Tp // bq, Sp // bk
    common = dict(spec=spec, bq=bq, bk=bk, padded_kv=Sp != spec.kv_len, precision=_precision(q.dtype))
    # delta_i = sum_d o_id do_id: an O(T) elementwise reduction, left to XLA.
    delta = jnp.einsum("BTHh,BTHh->BHT", o.astype(jnp.float32), do.astype(jnp.float32))
    row_q = pl.BlockSpec((None, Tp, None, Hdp), lambda n, b, h: (b, 0, h, 0))
    row_stat = pl.BlockSpec((None, None, Tp), lambda n, b, h: (b, h, 0))
    kv_out = pl.BlockSpec((None, bk, None, Hdp), lambda n, b, h: (b, n, h, 0))
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkdv_kernel, nq=nq, **common),
        grid=(nk, B, H),
        in_specs=_specs(B, H, G, Tp, Sp, Hdp, bq, bk, q_seg, slopes, q_blocked=False) + [row_q, row_stat, row_stat],
        out_specs=[kv_out, kv_out],
        out_shape=[jax.ShapeDtypeStruct((B, Sp, H, Hdp), jnp.float32)] * 2,
        compiler_params=_launch(bq, bk),
        interpret=interpret,
        name="jaxtx_flash_bwd_dkdv",
    )(q, k, v, q_seg, kv_seg, slopes, do, lse, delta)
    blk_q = pl.BlockSpec((None, bq, None, Hdp), lambda n, b, h: (b, n, h, 0))
    blk_stat = pl.BlockSpec((None, None, bq), lambda n, b, h: (b, h, n))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nk=nk, **common),
        grid=(nq, B, H),
        in_specs=_specs(B, H, G, Tp, Sp, Hdp, bq, bk, q_seg, slopes, q_blocked=True) + [blk_q, blk_stat, blk_stat],
        out_specs=blk_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_launch(bq, bk),
        interpret=interpret,
        name="jaxtx_flash_bwd_dq",
    )(q, k, v, q_seg, kv_seg, slopes, do, lse, delta)
    dk = dk_h.reshape(B, Sp, K, G, Hdp).sum(3).astype(k.dtype)
    dv = dv_h.reshape(B, Sp, K, G, Hdp).sum(3).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, slopes, cfg):
    return _fwd(q, k, v, q_seg, kv_seg, slopes, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, slopes, cfg):
    o, lse = _fwd(q, k, v, q_seg, kv_seg, slopes, cfg)
    return o, (q, k, v, q_seg, kv_seg, slopes, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, slopes, o, lse = res
    dq, dk, dv = _bwd(q, k, v, q_seg, kv_seg, slopes, o, lse, do, cfg)
    return dq, dk, dv, None, None, None if slopes is None else jnp.zeros_like(slopes)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block(requested: int, length: int) -> int:
    return min(_pow2_at_least(requested), _pow2_at_least(length))


def flash_attention_gpu(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                        alibi_slopes=None, softmax_scale=None, block_sizes: BlockSizes | None = None,
                        interpret=False):
    """q [B, T, H, Hd], k/v [B, S, K, Hd] -> [B, T, H, Hd] (q.dtype). Pallas/Triton; interpret=True runs on CPU."""
    B, T, H, Hd, S, K = check_inputs("flash_attention_gpu", q, k, v, window=window, segment_ids=segment_ids,
                                     kv_segment_ids=kv_segment_ids, alibi_slopes=alibi_slopes)
    if block_sizes is None:
        row_bytes = _pow2_at_least(Hd) * jnp.dtype(q.dtype).itemsize
        block_sizes = DEFAULT_BLOCK_SIZES if row_bytes <= 256 else WIDE_ROW_BLOCK_SIZES
    bs = block_sizes
    for name in ("block_q", "block_k", "bwd_q", "bwd_k"):
        val = getattr(bs, name)
        if val & (val - 1) or val < 16:
            raise ValueError(f"flash_attention_gpu: {name}={val} must be a power of two >= 16 (Triton tiles)")
    bq, bk = _block(bs.block_q, T), _block(bs.block_k, S)
    bq_b, bk_b = _block(bs.bwd_q, T), _block(bs.bwd_k, S)
    Tp = round_up(T, math.lcm(bq, bq_b))
    Sp = round_up(S, math.lcm(bk, bk_b))
    Hdp = _pow2_at_least(Hd)
    scale = float(Hd ** -0.5 if softmax_scale is None else softmax_scale)
    spec = MaskSpec(causal=bool(causal), window=window, kv_len=S, scale=scale)
    q_seg, kv_seg = padded_segments(segment_ids, kv_segment_ids, B, T, Tp, Sp)
    slopes = None
    if alibi_slopes is not None:
        slopes = pad_axis(alibi_slopes.astype(jnp.float32), 0, _pow2_at_least(H, 1))
    qp = pad_axis(pad_axis(q, 1, Tp), 3, Hdp)  # zero head-dim padding changes no dot product
    kp = pad_axis(pad_axis(k, 1, Sp), 3, Hdp)
    vp = pad_axis(pad_axis(v, 1, Sp), 3, Hdp)
    cfg = (spec, bq, bk, bq_b, bk_b, bool(interpret))
    o = _flash(qp, kp, vp, q_seg, kv_seg, slopes, cfg)
    return o[:, :T, :, :Hd]
