"""Pieces shared by every flash-attention body: block sizes, input checks, padding, and the mask.

Every backend (blockwise jnp, Pallas GPU, Pallas TPU) computes the same mask from the same function, `element_mask`,
so the three bodies cannot drift apart in what "causal", "window" or "segments" means. The semantics are those of
`jaxtx.kernels.reference.make_mask` (indices are positions, top-left aligned when T != S):
  causal            key j visible to query i when j <= i
  window W          i - j < W (and, when not causal, j - i < W: a symmetric band)
  segments          q_seg[i] == kv_seg[j]
  padding           j < kv_len (the wrapper pads S up to a block multiple; padded keys are never visible)
A query row with no visible key gets output 0 and zero gradients; kernels never divide by an empty sum.
"""
from __future__ import annotations

import dataclasses
import numbers

import jax.numpy as jnp

from jaxtx.kernels.reference import MASK_VALUE

__all__ = ["BlockSizes", "MaskSpec", "MASK_VALUE", "check_inputs", "canonical_segments", "element_mask",
           "block_visibility", "alibi_block", "pad_axis", "round_up"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along T (block_q) and S (block_k); the backward pass may use its own (None = the forward's)."""
    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if val is None and f.name.endswith("_bwd"):
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"BlockSizes.{f.name}={val!r}: expected a positive int")

    @property
    def bwd_q(self) -> int:
        return self.block_q if self.block_q_bwd is None else self.block_q_bwd

    @property
    def bwd_k(self) -> int:
        return self.block_k if self.block_k_bwd is None else self.block_k_bwd


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static (hashable) description of the mask and scale; kv_len is the unpadded S."""
    causal: bool
    window: int | None
    kv_len: int
    scale: float

    def __post_init__(self):  # numpy ints from configs -> python ints (hashable, usable as static loop bounds)
        if self.window is not None:
            object.__setattr__(self, "window", int(self.window))


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_axis(x, axis: int, new_len: int, mode: str = "constant"):
    if x is None or x.shape[axis] == new_len:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, pads, mode=mode)


def check_inputs(name, q, k, v, *, window=None, segment_ids=None, kv_segment_ids=None, alibi_slopes=None,
                 bias=None):
    """Raises ValueError naming the offending argument; returns (B, T, H, Hd, S, K)."""
    def err(msg):
        raise ValueError(f"{name}: {msg} (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        err("expected q [B, T, H, Hd] and k, v [B, S, K, Hd]")
    B, T, H, Hd = q.shape
    _, S, K, _ = k.shape
    if k.shape != v.shape:
        err("k and v must have the same shape")
    if k.shape[0] != B or k.shape[3] != Hd:
        err("k/v batch and head dim must match q")
    if H % K:
        err(f"query heads H={H} must be a multiple of kv heads K={K}")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window <= 0):
        err(f"window={window!r} must be a positive int or None")
    if segment_ids is not None and tuple(segment_ids.shape) != (B, T):
        err(f"segment_ids {tuple(segment_ids.shape)} must be [B, T] = {(B, T)}")
    if kv_segment_ids is not None and tuple(kv_segment_ids.shape) != (B, S):
        err(f"kv_segment_ids {tuple(kv_segment_ids.shape)} must be [B, S] = {(B, S)}")
    if segment_ids is not None and kv_segment_ids is None and T != S:
        err(f"segment_ids given with T={T} != S={S}: pass kv_segment_ids [B, S] too")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (H,):
        err(f"alibi_slopes {tuple(alibi_slopes.shape)} must be [H] = {(H,)}")
    if bias is not None:
        bs = tuple(bias.shape)
        if len(bs) != 4 or bs[0] not in (1, B) or bs[1] not in (1, H) or bs[2:] != (T, S):
            err(f"bias {bs} must be [B|1, H|1, T, S] with B={B}, H={H}, T={T}, S={S}")
    return B, T, H, Hd, S, K


def canonical_segments(segment_ids, kv_segment_ids):
    """-> (q_seg [B, T] int32, kv_seg [B, S] int32) or (None, None).

    kv_segment_ids alone means key padding (0 = pad): rewritten as q_seg = 1, kv_seg = (kv_segment_ids != 0).
    """
    if segment_ids is None and kv_segment_ids is None:
        return None, None
    if segment_ids is None:
        kv = (kv_segment_ids != 0).astype(jnp.int32)
        return None, kv  # caller fills q_seg with ones of [B, T]
    q = segment_ids.astype(jnp.int32)
    kv = q if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    return q, kv


def padded_segments(segment_ids, kv_segment_ids, B: int, T: int, Tp: int, Sp: int):
    """(q_seg [B, Tp], kv_seg [B, Sp]) or (None, None): canonical ids, all-ones query ids when only keys are padded,
    edge-padded so per-block segment ranges stay tight (padded keys are masked by kv_len anyway)."""
    q_seg, kv_seg = canonical_segments(segment_ids, kv_segment_ids)
    if kv_seg is not None and q_seg is None:
        q_seg = jnp.ones((B, T), jnp.int32)
    return pad_axis(q_seg, 1, Tp, "edge"), pad_axis(kv_seg, 1, Sp, "edge")


def element_mask(q_idx, k_idx, q_seg, kv_seg, spec: MaskSpec, *, padded_kv: bool):
    """Visibility of keys k_idx [bk] to queries q_idx [bq] -> bool [..., bq, bk] (leading dims from the segment ids
    q_seg [..., bq] / kv_seg [..., bk]) or None when everything is visible.

    Indices that are already 2-D (q_idx [bq, 1|bk], k_idx [1|bq, bk], segments [bq, 1] / [1, bk]: the layout Mosaic
    wants, no 1-D vectors) are used as given."""
    mask = None

    def _and(new):
        return new if mask is None else jnp.logical_and(mask, new)

    two_d = q_idx.ndim == 2
    qi, kj = (q_idx, k_idx) if two_d else (q_idx[:, None], k_idx[None, :])
    if padded_kv:
        mask = _and(kj < spec.kv_len)
    if spec.causal:
        mask = _and(kj <= qi)
    if spec.window is not None:
        mask = _and(qi - kj < spec.window)
        if not spec.causal:
            mask = _and(kj - qi < spec.window)
    if q_seg is not None:
        mask = _and(q_seg == kv_seg if two_d else q_seg[..., :, None] == kv_seg[..., None, :])
    return mask


def block_visibility(nq, bq, nk, bk, q_seg, kv_seg, spec: MaskSpec):
    """bool [B|1, nq, nk]: can any query of q-block i see any key of kv-block j? (Conservative: True may still hold
    only masked entries; False is exact, so skipping those blocks never changes the result.)"""
    qs = jnp.arange(nq)[:, None] * bq
    qe = qs + bq - 1
    ks = jnp.arange(nk)[None, :] * bk
    ke = ks + bk - 1
    vis = jnp.broadcast_to(ks < spec.kv_len, (nq, nk))
    if spec.causal:
        vis = vis & (ks <= qe)
    if spec.window is not None:
        vis = vis & (qs - ke < spec.window)
        if not spec.causal:
            vis = vis & (ks - qe < spec.window)
    vis = vis[None]
    if q_seg is not None:
        B = q_seg.shape[0]
        qb = q_seg.reshape(B, nq, bq)
        kb = kv_seg.reshape(B, nk, bk)
        qmin, qmax = qb.min(-1)[:, :, None], qb.max(-1)[:, :, None]
        kmin, kmax = kb.min(-1)[:, None, :], kb.max(-1)[:, None, :]
        vis = vis & (qmin <= kmax) & (kmin <= qmax)
    return vis


def alibi_block(slopes, q_idx, k_idx):
    """-slope * |i - j| for slopes [..., 1, 1]-broadcastable -> float32 [..., bq, bk]."""
    dist = jnp.abs(q_idx[:, None] - k_idx[None, :]).astype(jnp.float32)
    return -slopes * dist
