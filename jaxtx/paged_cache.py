"""The paged KV cache: one pool of fixed-size pages shared by every sequence of a serving engine.

    cache = PagedKVCache.init(cfg, num_pages, page_size)                 # the model's dtype; quantize=True: int8
    cache = cache.with_step(slot_mapping, page_table, kv_lens, cu_q_lens, num_seqs)
    logits_1MV, cache = model.apply({"params": p}, ids_1N, positions=pos_1N, cache=cache, logits_at=idx_1M)

One forward pass runs a flat ragged batch: B = 1 and T = N tokens, the tokens of one sequence contiguous (decode
tokens and prefill chunks alike). Each layer writes every token's new K/V at its slot (slot_mapping [N]: page *
page_size + offset; -1 = padding, not written), then calls `jaxtx.kernels.ragged_paged_attention`, which reads each
sequence's pages through page_table [R, pages_per_seq] up to kv_lens [R] (this step's tokens included). So a prefill
chunk attends to its own earlier pages and to itself, and what a sequence never wrote is never read.

Layout per layer [K, P, page_size, Hd] (the kernels' layout: a page of one kv head is contiguous), int8 pages with
float32 scales [K, P, page_size] (one per token per head, like the static cache). The layers follow the params'
layout as in `KVCache`: stacked [L, K, P, ps, Hd] for a scanned model, a tuple of L arrays for an unrolled one. The
tuple is the fast one: a layer's pages are then its own buffer, where a scanned stack reads its layer's slice of the
pool as a copy every step. The pages are the only large leaves: donate the cache to the jitted step and they are
updated in place. The allocator (which pages a sequence holds) lives in the engine, on the host.
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxtx import kernels
from jaxtx.cache import AttentionContext, LayerLayout, Layers, layer_zeros, quantize_int8, read_layer, update_layer
from jaxtx.config import ModelConfig
from jaxtx.layers.common import dtype_of


@flax.struct.dataclass
class PagedStep:
    """The metadata of one ragged step (see the module docstring; shapes as in the engine contract)."""

    slot_mapping: jax.Array  # [N] int32 flat slot of each token, -1 = padding
    page_table: jax.Array  # [R, pages_per_seq] int32
    kv_lens: jax.Array  # [R] int32 tokens of each sequence including this step's
    cu_q_lens: jax.Array  # [R + 1] int32 query runs on the flat axis
    num_seqs: jax.Array  # scalar int32 rows in use


@flax.struct.dataclass
class PagedKVCache(LayerLayout):
    k: Layers  # [L, K, P, ps, Hd] or L x [K, P, ps, Hd] (int8 when quantized)
    v: Layers
    k_scale: Optional[Layers] = None  # [L, K, P, ps] or L x [K, P, ps] float32 (int8 pages only)
    v_scale: Optional[Layers] = None
    step: Optional[PagedStep] = None  # set by with_step, consumed by one forward pass
    dtype: str = flax.struct.field(pytree_node=False, default="float32")  # the K/V compute dtype

    @classmethod
    def init(cls, cfg: ModelConfig, num_pages: int, page_size: int, *, dtype=None,
             quantize: bool = False) -> "PagedKVCache":
        """An empty page pool for cfg's decoder layers (stacked when cfg.scan_layers), in the model's dtype unless
        `dtype` is given (quantize=True: int8 pages with float32 scales)."""
        if cfg.kind != "decoder":
            raise ValueError(f"PagedKVCache.init: model kind {cfg.kind!r}; the paged cache serves decoder-only "
                             "models (encoder-decoder models keep the static KVCache)")
        if cfg.position in ("alibi", "t5"):
            raise ValueError(f"PagedKVCache.init: position={cfg.position!r} needs a per-key bias the paged kernels "
                             "do not take; use the static KVCache")
        for name, n in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"PagedKVCache.init: {name}={n!r} must be an int >= 1")
        dtype = jnp.dtype(dtype_of(cfg.dtype) if dtype is None else dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"PagedKVCache.init: dtype={dtype} must be a float dtype (int8 pages: quantize=True)")
        shape = (cfg.kv_heads, num_pages, page_size, cfg.hd)

        def zeros(shape, dt):
            return layer_zeros(cfg, cfg.n_layers, shape, dt)
        return cls(k=zeros(shape, jnp.int8 if quantize else dtype), v=zeros(shape, jnp.int8 if quantize else dtype),
                   k_scale=zeros(shape[:-1], jnp.float32) if quantize else None,
                   v_scale=zeros(shape[:-1], jnp.float32) if quantize else None, dtype=dtype.name)

    @property
    def _layer_shape(self) -> tuple:  # [K, P, ps, Hd]
        return tuple(self.k.shape[1:]) if self.stacked else tuple(self.k[0].shape)

    @property
    def num_pages(self) -> int:
        return self._layer_shape[1]

    @property
    def page_size(self) -> int:
        return self._layer_shape[2]

    def bytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((self.k, self.v, self.k_scale, self.v_scale)))

    def with_step(self, slot_mapping, page_table, kv_lens, cu_q_lens, num_seqs) -> "PagedKVCache":
        """The cache with one step's metadata attached (the next forward pass reads and clears it)."""
        slot_mapping, page_table, kv_lens, cu_q_lens = (jnp.asarray(a, jnp.int32) for a in
                                                        (slot_mapping, page_table, kv_lens, cu_q_lens))
        num_seqs = jnp.asarray(num_seqs, jnp.int32)
        shapes = dict(slot_mapping=slot_mapping.shape, page_table=page_table.shape, kv_lens=kv_lens.shape,
                      cu_q_lens=cu_q_lens.shape, num_seqs=num_seqs.shape)
        R = kv_lens.shape[0] if kv_lens.ndim == 1 else -1
        if (slot_mapping.ndim != 1 or page_table.ndim != 2 or page_table.shape[0] != R
                or cu_q_lens.shape != (R + 1,) or num_seqs.ndim != 0):
            raise ValueError("PagedKVCache.with_step: expected slot_mapping [N], page_table [R, pages_per_seq], "
                             f"kv_lens [R], cu_q_lens [R + 1], num_seqs scalar; got {shapes}")
        return self.replace(step=PagedStep(slot_mapping=slot_mapping, page_table=page_table, kv_lens=kv_lens,
                                           cu_q_lens=cu_q_lens, num_seqs=num_seqs))

    def default_positions(self, T: int):
        raise ValueError("PagedKVCache: pass positions=[1, N] (each flat token's position); a paged cache has no "
                         "per-row length to continue from")

    # ------------------------------------------------------------------------------------------ the forward pass
    def begin(self, cfg: ModelConfig, positions_BT, *, encoded_len: Optional[int] = None) -> "PagedKVCache":
        if self.step is None:
            raise ValueError("PagedKVCache: no step metadata; call cache.with_step(slot_mapping, page_table, kv_lens, "
                             "cu_q_lens, num_seqs) before model.apply")
        if encoded_len is not None:
            raise ValueError("PagedKVCache: encoder-decoder models keep the static KVCache")
        N = self.step.slot_mapping.shape[0]
        if positions_BT.shape != (1, N):
            raise ValueError(f"PagedKVCache: the input must be one flat ragged row [1, N] with N = len(slot_mapping) "
                             f"= {N}; got positions of shape {tuple(positions_BT.shape)}")
        return self

    def attend(self, layer, q_BTHd, k_BTKh, v_BTKh, ctx: AttentionContext, *, window=None, softmax_scale=None):
        """Write this layer's new K/V [1, N, K, Hd] at the step's slots, then ragged paged attention of q [1, N, H, Hd]
        -> ([1, N, H, Hd], cache)."""
        st = self.step
        if ctx.alibi is not None or ctx.bias is not None:
            raise ValueError("PagedKVCache: ALiBi / additive attention bias is not supported by the paged kernels")
        P, ps = self.num_pages, self.page_size
        slot = st.slot_mapping
        page = jnp.where(slot >= 0, slot // ps, P)  # P is out of bounds: padding tokens are dropped, not written
        off = jnp.where(slot >= 0, slot % ps, 0)
        k_NKh, v_NKh = k_BTKh[0], v_BTKh[0]
        if self.quantized:
            k_new, ks_new = quantize_int8(k_NKh)  # [N, K, Hd], [N, K]
            v_new, vs_new = quantize_int8(v_NKh)
        else:
            k_new, v_new = k_NKh.astype(self.dtype), v_NKh.astype(self.dtype)

        def write(a, new):
            # stacked: index (layer, :, page, off): the [N] indices are split by the slice, so [N] leads -> [N, K, ..]
            # per layer: (:, page, off): adjacent indices stay in place -> [K, N, ...]
            def put(c, pre):
                upd = new if pre else jnp.swapaxes(new, 0, 1)
                return c.at[pre + (slice(None), page, off)].set(upd, mode="drop")
            return update_layer(a, layer, put)

        changes = dict(k=write(self.k, k_new), v=write(self.v, v_new))
        if self.quantized:
            changes.update(k_scale=write(self.k_scale, ks_new), v_scale=write(self.v_scale, vs_new))
        o = kernels.ragged_paged_attention(
            q_BTHd[0], read_layer(changes["k"], layer), read_layer(changes["v"], layer), kv_lens=st.kv_lens,
            page_table=st.page_table, cu_q_lens=st.cu_q_lens, num_seqs=st.num_seqs,
            k_scales=read_layer(changes.get("k_scale"), layer), v_scales=read_layer(changes.get("v_scale"), layer),
            window=window, softmax_scale=None if softmax_scale is None else float(softmax_scale))
        return o[None], self.replace(**changes)

    def end(self) -> "PagedKVCache":
        return self.replace(step=None)
