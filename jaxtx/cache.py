"""The static-shape KV cache: one pytree allocated once per (batch, max length) and updated in place.

Layout per layer [B, K, S, Hd], so that decode reads K and V contiguously per head. The layers follow the params'
layout: stacked [L, B, K, S, Hd] for a scanned model (the scan carries it), a tuple of L arrays for an unrolled one.
The tuple is what makes unrolled decode fast: each layer reads and updates its own buffer in place, where a slice of
a stacked array is a copy (measured, 110M model, batch 8: the 24 slice copies cost 7 of 33 ms per step).
`pos [B, S]` records the absolute position held in every slot (-1 = empty), shared by all layers; attention masks by
position, which makes padding, per-row lengths and the sliding-window ring buffer one mechanism.

Sliding-window models keep a ring buffer (slot = pos % S). S = window is enough for token-by-token decoding, but a
caller that writes ahead and may take tokens back (speculative verification writes k drafts past the last kept
token) needs `spare` extra slots, or a rejected draft would overwrite a position the window still needs. Extra slots
cost nothing in correctness: attention masks by position and window, never by slot count.
`truncate(lengths)` takes tokens back: slots at positions >= lengths become empty (pos -1), so what was written there
is never visible again and `lengths` stays the next position of every row.
"""
from __future__ import annotations

from typing import Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

from jaxtx.config import ModelConfig

Layers = Union[jax.Array, tuple]  # stacked over layers (scanned models) or one array per layer (unrolled models)
PER_LAYER = ("k", "v", "k_scale", "v_scale", "cross_k", "cross_v")


@flax.struct.dataclass
class KVCache:
    k: Layers  # [L, B, K, S, Hd] or L x [B, K, S, Hd] (int8 when quantized)
    v: Layers
    pos: jax.Array  # [B, S] int32, absolute position in each slot, -1 = empty
    lengths: jax.Array  # [B] int32, the next position of each row
    k_scale: Optional[Layers] = None  # [L, B, K, S] or L x [B, K, S] float32 (int8 caches only)
    v_scale: Optional[Layers] = None
    cross_k: Optional[Layers] = None  # [L, B, S_enc, K, Hd] or L x [...] encoder-decoder: set on the first call
    cross_v: Optional[Layers] = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, quantize: bool = False,
             spare: int = 0):
        """An empty cache, laid out like cfg's layers (stacked when cfg.scan_layers). Sliding-window models keep only
        min(max_len, window + spare) slots (a ring buffer); `spare` slots let a caller write up to `spare` tokens it
        may take back (`truncate`) without losing positions the window needs. Without a window every position below
        max_len has its own slot and `spare` changes nothing."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache.init: batch={batch} and max_len={max_len} must be >= 1")
        if spare < 0:
            raise ValueError(f"KVCache.init: spare={spare} must be >= 0 (extra ring-buffer slots beyond the window)")
        S = max_len if cfg.window is None else min(max_len, cfg.window + spare)
        L = cfg.decoder_layers if cfg.kind == "encoder_decoder" else cfg.n_layers
        shape = (batch, cfg.kv_heads, S, cfg.hd)
        kv_dtype = jnp.int8 if quantize else dtype

        def zeros(shape, dt):  # separate buffers per field and layer: each is updated in place
            return jnp.zeros((L,) + shape, dt) if cfg.scan_layers else tuple(jnp.zeros(shape, dt) for _ in range(L))
        return cls(k=zeros(shape, kv_dtype), v=zeros(shape, kv_dtype),
                   pos=jnp.full((batch, S), -1, jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
                   k_scale=zeros(shape[:-1], jnp.float32) if quantize else None,
                   v_scale=zeros(shape[:-1], jnp.float32) if quantize else None)

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    @property
    def stacked(self) -> bool:
        """True when the per-layer fields are [L, ...] arrays (scanned models), False for tuples (unrolled)."""
        return not isinstance(self.k, tuple)

    def take(self, rows) -> "KVCache":
        """A cache whose row r is row `rows[r]` of this one (rows: int array of any length: select, reorder, repeat;
        beam search uses it)."""
        rows = jnp.asarray(rows)
        changes = {"pos": self.pos[rows], "lengths": self.lengths[rows]}
        for name in PER_LAYER:
            a = getattr(self, name)
            if a is not None:  # batch is axis 1 of a stacked array, axis 0 of each per-layer array
                changes[name] = jnp.take(a, rows, axis=1) if self.stacked else tuple(x[rows] for x in a)
        return self.replace(**changes)

    def truncate(self, lengths_B) -> "KVCache":
        """Take back every token at a position >= lengths_B[b] in row b (lengths_B: int [B]; a row's length never
        grows here). Those slots are marked empty (pos -1) rather than left to be overwritten before they are read:
        a sliding-window chunk attends over the old cache before writing (see attention.py), so a stale entry at a
        position it is about to rewrite would be visible next to the new one. The K/V bytes stay; they are dead."""
        lengths_B = jnp.minimum(self.lengths, jnp.asarray(lengths_B, jnp.int32))
        return self.replace(pos=jnp.where(self.pos >= lengths_B[:, None], -1, self.pos), lengths=lengths_B)

    def layer_arrays(self) -> dict:
        """The per-layer fields that are set (stacked arrays or tuples), for the layer stack."""
        return {n: getattr(self, n) for n in PER_LAYER if getattr(self, n) is not None}

    def bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))


def cache_context(cfg: ModelConfig, cache: KVCache, positions_BT):
    """Where each new token goes and what every slot holds before/after the write (shared by all layers)."""
    B, T = positions_BT.shape
    S = cache.slots
    valid = positions_BT >= 0
    if cfg.window is not None:  # ring buffer: slot = pos % S; of a long chunk only the last S tokens are kept
        row_max = jnp.max(positions_BT, axis=1, keepdims=True)
        keep = valid & (positions_BT > row_max - S)
        slot = positions_BT % S
    else:
        keep = valid & (positions_BT < S)
        slot = positions_BT
    write_idx = jnp.where(keep, slot, S)
    rows = jnp.arange(B)[:, None]
    kv_pos_new = cache.pos.at[rows, write_idx].set(positions_BT, mode="drop")
    ctx = {"positions": positions_BT, "write_idx": write_idx, "kv_pos_new": kv_pos_new}
    if cfg.window is not None and T > 1:  # the attention layer attends over [old cache ++ new] (see attention.py)
        ctx["kv_pos_concat"] = jnp.concatenate([cache.pos, jnp.where(valid, positions_BT, -1)], axis=1)
    lengths = jnp.maximum(cache.lengths, jnp.max(positions_BT, axis=1) + 1)
    return ctx, kv_pos_new, lengths


def with_layers(cache: KVCache, arrays: dict, pos, lengths) -> KVCache:
    return cache.replace(pos=pos, lengths=lengths, **arrays)
