"""The static-shape KV cache: one pytree allocated once per (batch, max length) and updated in place.

Layout per layer [B, K, S, Hd] (stacked over layers: [L, B, K, S, Hd]) so that decode reads K and V contiguously per
head. `pos [B, S]` records the absolute position held in every slot (-1 = empty), shared by all layers; attention
masks by position, which makes padding, per-row lengths and the sliding-window ring buffer one mechanism.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxtx.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, Hd] (int8 when quantized)
    v: jax.Array
    pos: jax.Array  # [B, S] int32, absolute position in each slot, -1 = empty
    lengths: jax.Array  # [B] int32, the next position of each row
    k_scale: Optional[jax.Array] = None  # [L, B, K, S] float32 (int8 caches only)
    v_scale: Optional[jax.Array] = None
    cross_k: Optional[jax.Array] = None  # [L, B, S_enc, K, Hd] encoder-decoder: computed once, on the first call
    cross_v: Optional[jax.Array] = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, quantize: bool = False):
        """An empty cache. Sliding-window models keep only min(max_len, window) slots (a ring buffer)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache.init: batch={batch} and max_len={max_len} must be >= 1")
        S = max_len if cfg.window is None else min(max_len, cfg.window)
        L = cfg.decoder_layers if cfg.kind == "encoder_decoder" else cfg.n_layers
        shape = (L, batch, cfg.kv_heads, S, cfg.hd)
        kv_dtype = jnp.int8 if quantize else dtype
        scale = jnp.zeros(shape[:-1], jnp.float32) if quantize else None
        return cls(k=jnp.zeros(shape, kv_dtype), v=jnp.zeros(shape, kv_dtype),
                   pos=jnp.full((batch, S), -1, jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
                   k_scale=scale, v_scale=scale)

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    def layer_arrays(self) -> dict:
        """The per-layer arrays (leading axis L) that the layer stack scans over."""
        d = {"k": self.k, "v": self.v, "k_scale": self.k_scale, "v_scale": self.v_scale,
             "cross_k": self.cross_k, "cross_v": self.cross_v}
        return {n: a for n, a in d.items() if a is not None}

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
