"""The model <-> cache interface, and the static-shape KV cache.

One forward pass with a cache goes:
    cache = cache.begin(cfg, positions_BT)           # once: where the new tokens go (shared by every layer)
    o, cache = cache.attend(layer, q, k, v, ctx)     # in every layer: write the new K/V, attend, return the output
    cache = cache.end()                              # once: drop the step's metadata, advance lengths
The attention layer never sees the cache's layout: `layer` is a traced index in a scanned stack and a Python int in
an unrolled one, and the cache knows how its arrays are laid out. Two caches implement it: `KVCache` below (one
contiguous buffer per row) and `jaxtx.paged_cache.PagedKVCache` (a page pool shared by ragged sequences).
Everything else the layers share (positions, RoPE tables, ALiBi slopes, masks, the encoder output) is one typed
`AttentionContext` built by the model.

KVCache layout per layer [B, K, S, Hd], so that decode reads K and V contiguously per head. The layers follow the
params' layout: stacked [L, B, K, S, Hd] for a scanned model (the scan carries it), a tuple of L arrays for an
unrolled one. The tuple is what makes unrolled decode fast: each layer reads and updates its own buffer in place,
where a slice of a stacked array is a copy (measured, 110M model, batch 8: the 24 slice copies cost 7 of 33 ms per
step). `pos [B, S]` records the absolute position held in every slot (-1 = empty), shared by all layers; attention
masks by position, which makes padding, per-row lengths and the sliding-window ring buffer one mechanism.

Sliding-window models keep a ring buffer (slot = pos % S). S = window is enough for token-by-token decoding, but a
caller that writes ahead and may take tokens back (speculative verification writes k drafts past the last kept
token) needs `spare` extra slots, or a rejected draft would overwrite a position the window still needs. Extra slots
cost nothing in correctness: attention masks by position and window, never by slot count.
`truncate(lengths)` takes tokens back: slots at positions >= lengths become empty (pos -1), so what was written there
is never visible again and `lengths` stays the next position of every row.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Union

import flax.struct
import jax
import jax.numpy as jnp

from jaxtx import kernels
from jaxtx.config import ModelConfig
from jaxtx.layers.common import dtype_of

Layers = Union[jax.Array, tuple]  # stacked over layers (scanned models) or one array per layer (unrolled models)
PER_LAYER = ("k", "v", "k_scale", "v_scale", "cross_k", "cross_v")


@flax.struct.dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares (built once by the model)."""

    positions: jax.Array  # [B, T] int32 absolute position of each query token (-1 = padding)
    rope: Optional[tuple] = None  # (cos, sin) [B, T, Hd] float32
    alibi: Optional[jax.Array] = None  # [H] float32 slopes
    segment_ids: Optional[jax.Array] = None  # [B, T] int32 (packed documents / query padding)
    kv_segment_ids: Optional[jax.Array] = None  # [B, S] int32 (key padding of an encoder)
    bias: Optional[jax.Array] = None  # [B|1, H, T, S] float32 additive bias (T5 relative positions)
    encoded: Optional[jax.Array] = None  # [B, S_enc, D] encoder output (cross-attention)
    encoded_mask: Optional[jax.Array] = None  # [B, S_enc] int32, 1 = token
    # [B, T] int32 LoRA adapter slot of each token when the params hold stacked adapters (jaxtx.lora.stack_adapters;
    # 0 = the base alone). Every adapted Dense of the forward pass selects with it, the FFN's too.
    adapter_ids: Optional[jax.Array] = None


class Cache(Protocol):
    """What the model and the attention layer ask of a cache (KVCache, PagedKVCache)."""

    stacked: bool  # per-layer arrays stacked [L, ...] (scanned models) or a tuple of L (unrolled)

    def begin(self, cfg: ModelConfig, positions_BT, *, encoded_len: Optional[int] = None) -> "Cache": ...

    def attend(self, layer, q_BTHd, k_BTKh, v_BTKh, ctx: AttentionContext, *, window, softmax_scale
               ) -> tuple[jax.Array, "Cache"]: ...

    def end(self) -> "Cache": ...


def quantize_int8(x, axis=-1):
    """Symmetric int8 with one float32 scale per vector along `axis` (per token per head for K/V)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=axis) / 127.0
    q = jnp.round(xf / jnp.expand_dims(jnp.where(scale == 0, 1.0, scale), axis))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def read_layer(a: Optional[Layers], layer):
    """Layer `layer` of per-layer arrays: a dynamic slice of a stacked array, an element of a tuple."""
    if a is None or isinstance(a, tuple):
        return None if a is None else a[layer]
    return jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False)


def layer_zeros(cfg: ModelConfig, n_layers: int, shape: tuple, dtype) -> Layers:
    """Zeros for one per-layer field laid out like cfg's layers: stacked [L, *shape] when cfg.scan_layers, else a
    tuple of L separate buffers (each updated in place by its layer)."""
    if cfg.scan_layers:
        return jnp.zeros((n_layers,) + tuple(shape), dtype)
    return tuple(jnp.zeros(shape, dtype) for _ in range(n_layers))


class LayerLayout:
    """What both caches (KVCache, PagedKVCache) share: per-layer fields `k`, `v`, laid out as `layer_zeros` makes
    them, and `k_scale`, set only for int8 storage."""

    @property
    def stacked(self) -> bool:
        """True when the per-layer fields are [L, ...] arrays (scanned models), False for tuples (unrolled)."""
        return not isinstance(self.k, tuple)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def update_layer(a: Layers, layer, fn: Callable[[jax.Array, tuple], jax.Array]) -> Layers:
    """`fn(array, prefix)` applied to layer `layer`, where `prefix` is the index tuple that selects the layer inside
    `array` (`(layer,)` for a stacked array, `()` for a tuple element), so a scatter goes straight into the stack."""
    if isinstance(a, tuple):
        return a[:layer] + (fn(a[layer], ()),) + a[layer + 1:]
    return fn(a, (layer,))


@flax.struct.dataclass
class StaticStep:
    """One forward pass's writes and reads into a KVCache, computed once for all layers by `KVCache.begin`."""

    positions: jax.Array  # [B, T] positions of the new tokens (-1 = padding, not written)
    write_idx: jax.Array  # [B, T] slot each new token goes to; S = "do not write"
    kv_pos: jax.Array  # [B, S'] absolute position of each key the queries see (-1 = empty)
    pos: jax.Array  # [B, S] slot positions after the write
    lengths: jax.Array  # [B] lengths after the write
    attend_first: bool = flax.struct.field(pytree_node=False, default=False)  # ring-buffer chunk: see attend
    fill_cross: bool = flax.struct.field(pytree_node=False, default=False)  # cross K/V computed on this call


@flax.struct.dataclass
class KVCache(LayerLayout):
    k: Layers  # [L, B, K, S, Hd] or L x [B, K, S, Hd] (int8 when quantized)
    v: Layers
    pos: jax.Array  # [B, S] int32, absolute position in each slot, -1 = empty
    lengths: jax.Array  # [B] int32, the next position of each row
    k_scale: Optional[Layers] = None  # [L, B, K, S] or L x [B, K, S] float32 (int8 caches only)
    v_scale: Optional[Layers] = None
    cross_k: Optional[Layers] = None  # [L, B, S_enc, K, Hd] or L x [...] encoder-decoder: set on the first call
    cross_v: Optional[Layers] = None
    step: Optional[StaticStep] = None  # set between begin() and end() only
    ring: bool = flax.struct.field(pytree_node=False, default=False)  # sliding-window ring buffer (slot = pos % S)
    dtype: str = flax.struct.field(pytree_node=False, default="float32")  # the K/V compute dtype (int8: dequantized)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None, quantize: bool = False,
             spare: int = 0) -> "KVCache":
        """An empty cache, laid out like cfg's layers (stacked when cfg.scan_layers), in the model's dtype unless
        `dtype` is given. Sliding-window models keep only min(max_len, window + spare) slots (a ring buffer); `spare`
        slots let a caller write up to `spare` tokens it may take back (`truncate`) without losing positions the
        window needs. Without a window every position below max_len has its own slot and `spare` changes nothing."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache.init: batch={batch} and max_len={max_len} must be >= 1")
        if spare < 0:
            raise ValueError(f"KVCache.init: spare={spare} must be >= 0 (extra ring-buffer slots beyond the window)")
        dtype = jnp.dtype(dtype_of(cfg.dtype) if dtype is None else dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"KVCache.init: dtype={dtype} must be a float dtype (int8 storage: quantize=True)")
        S = max_len if cfg.window is None else min(max_len, cfg.window + spare)
        L = cfg.decoder_layers if cfg.kind == "encoder_decoder" else cfg.n_layers
        shape = (batch, cfg.kv_heads, S, cfg.hd)
        kv_dtype = jnp.int8 if quantize else dtype

        def zeros(shape, dt):
            return layer_zeros(cfg, L, shape, dt)
        return cls(k=zeros(shape, kv_dtype), v=zeros(shape, kv_dtype),
                   pos=jnp.full((batch, S), -1, jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
                   k_scale=zeros(shape[:-1], jnp.float32) if quantize else None,
                   v_scale=zeros(shape[:-1], jnp.float32) if quantize else None,
                   ring=cfg.window is not None, dtype=dtype.name)

    @property
    def slots(self) -> int:
        return self.pos.shape[1]

    def is_full(self, next_pos_B) -> jax.Array:
        """[B] bool: the row cannot take a token at next_pos_B (a ring buffer never fills)."""
        next_pos_B = jnp.asarray(next_pos_B)
        return jnp.zeros(next_pos_B.shape, bool) if self.ring else next_pos_B >= self.slots

    def default_positions(self, T: int):
        """Positions of T new tokens appended to every row: [B, T]."""
        return self.lengths[:, None] + jnp.arange(T)[None, :]

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
        a sliding-window chunk attends over the old cache before writing (see `attend`), so a stale entry at a
        position it is about to rewrite would be visible next to the new one. The K/V bytes stay; they are dead."""
        lengths_B = jnp.minimum(self.lengths, jnp.asarray(lengths_B, jnp.int32))
        return self.replace(pos=jnp.where(self.pos >= lengths_B[:, None], -1, self.pos), lengths=lengths_B)

    def bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

    # ------------------------------------------------------------------------------------------ the forward pass
    def begin(self, cfg: ModelConfig, positions_BT, *, encoded_len: Optional[int] = None) -> "KVCache":
        """Where each new token goes and what every slot holds after the write (shared by all layers). An
        encoder-decoder cache without cross K/V gets zeroed buffers that the layers fill on this call."""
        B, T = positions_BT.shape
        if B != self.pos.shape[0]:
            raise ValueError(f"KV cache holds {self.pos.shape[0]} rows but the input has batch B={B}")
        S = self.slots
        valid = positions_BT >= 0
        if self.ring:  # slot = pos % S; of a long chunk only the last S tokens are kept
            row_max = jnp.max(positions_BT, axis=1, keepdims=True)
            keep = valid & (positions_BT > row_max - S)
            slot = positions_BT % S
        else:
            keep = valid & (positions_BT < S)
            slot = positions_BT
        write_idx = jnp.where(keep, slot, S)
        rows = jnp.arange(B)[:, None]
        pos = self.pos.at[rows, write_idx].set(positions_BT, mode="drop")
        # A ring-buffer chunk (T > 1) may overwrite a slot an earlier query of the same chunk still needs: attend over
        # [old cache ++ new tokens] first, write afterwards. Otherwise write first and attend over the cache.
        attend_first = self.ring and T > 1
        kv_pos = jnp.concatenate([self.pos, jnp.where(valid, positions_BT, -1)], axis=1) if attend_first else pos
        lengths = jnp.maximum(self.lengths, jnp.max(positions_BT, axis=1) + 1)
        fill_cross = encoded_len is not None and self.cross_k is None
        cache = self
        if fill_cross:
            L = self.k.shape[0] if self.stacked else len(self.k)
            shape = (B, encoded_len, cfg.kv_heads, cfg.hd)
            zeros = (lambda: jnp.zeros((L,) + shape, self.dtype)) if self.stacked else \
                (lambda: tuple(jnp.zeros(shape, self.dtype) for _ in range(L)))
            cache = cache.replace(cross_k=zeros(), cross_v=zeros())
        return cache.replace(step=StaticStep(positions=positions_BT, write_idx=write_idx, kv_pos=kv_pos, pos=pos,
                                             lengths=lengths, attend_first=attend_first, fill_cross=fill_cross))

    @property
    def kv_positions(self):
        """[B, S'] absolute position of every key this step's queries attend to (inside begin/end)."""
        return self.step.kv_pos

    def attend(self, layer, q_BTHd, k_BTKh, v_BTKh, ctx: AttentionContext, *, window=None, softmax_scale=None):
        """Write this layer's new K/V [B, T, K, Hd] and attend q [B, T, H, Hd] over the cache -> ([B, T, H, Hd],
        cache). `layer`: traced index into stacked arrays, or a Python int for per-layer tuples."""
        st = self.step
        if st is None:
            raise ValueError("KVCache.attend called outside begin()/end(): call the model with cache=, not a layer")
        if self.quantized:
            k_new, ks_new = quantize_int8(k_BTKh)  # [B, T, K, Hd], [B, T, K]
            v_new, vs_new = quantize_int8(v_BTKh)
        else:
            k_new, v_new = k_BTKh.astype(self.dtype), v_BTKh.astype(self.dtype)
        rows = jnp.arange(q_BTHd.shape[0])[:, None]

        def write(a, new):  # a [(L,) B, K, S, ...]; new [B, T, K, ...]: mixed indexing puts [B, T] first
            return update_layer(a, layer, lambda c, pre: c.at[pre + (rows, slice(None), st.write_idx)].set(
                new, mode="drop"))

        changes = dict(k=write(self.k, k_new), v=write(self.v, v_new))
        if self.quantized:
            changes.update(k_scale=write(self.k_scale, ks_new), v_scale=write(self.v_scale, vs_new))
        kw = dict(q_positions=st.positions, kv_positions=st.kv_pos, window=window, alibi_slopes=ctx.alibi,
                  bias=ctx.bias, softmax_scale=softmax_scale)
        if st.attend_first:
            t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [B, T, K, ...] -> [B, K, T, ...]
            cat = lambda name, new: jnp.concatenate([read_layer(getattr(self, name), layer), t(new)], axis=2)  # noqa
            o = kernels.decode_attention(q_BTHd, cat("k", k_new), cat("v", v_new),
                                         k_scale=cat("k_scale", ks_new) if self.quantized else None,
                                         v_scale=cat("v_scale", vs_new) if self.quantized else None, **kw)
        else:
            o = kernels.decode_attention(q_BTHd, read_layer(changes["k"], layer), read_layer(changes["v"], layer),
                                         k_scale=read_layer(changes.get("k_scale"), layer),
                                         v_scale=read_layer(changes.get("v_scale"), layer), **kw)
        return o, self.replace(**changes)

    def cross_kv(self, layer, compute: Callable[[], tuple]):
        """Cross-attention K/V [B, S_enc, K, Hd] of this layer: computed by `compute()` and stored on the first call,
        read afterwards. Returns (k, v, cache)."""
        if self.step.fill_cross:
            k, v = compute()
            put = lambda a, new: update_layer(a, layer, lambda c, pre: c.at[pre].set(new.astype(c.dtype)))  # noqa
            return k, v, self.replace(cross_k=put(self.cross_k, k), cross_v=put(self.cross_v, v))
        return read_layer(self.cross_k, layer), read_layer(self.cross_v, layer), self

    def end(self) -> "KVCache":
        return self.replace(pos=self.step.pos, lengths=self.step.lengths, step=None)
