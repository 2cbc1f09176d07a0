"""Multi-head attention (MHA / MQA / GQA), self or cross, with an optional static-shape KV cache.

Every call goes through `jaxtx.kernels` (`attention` for training and prefill, `decode_attention` against the cache),
so the kernel dispatcher picks the fastest correct path per platform.

Cache semantics (see jaxtx/cache.py): the layer gets k, v [B, K, S, Hd] (int8 + scales [B, K, S] when quantized),
or, in a scanned stack, the arrays stacked over layers [L, ...] plus its index "layer": new tokens are then scattered
straight into the stacked arrays (a few bytes per token) and attention reads this layer's slice. The model computes,
once for all layers, the slot each new token is written to (`write_idx [B, T]`, S for "do not write") and the
absolute position every slot holds after the write (`kv_pos_new`; `kv_pos_concat` for the ring-buffer prefill below).
- Usual case: write first, then attend over the whole cache with position masks.
- Sliding-window ring buffer with T > 1 new tokens (prefill): a new token may overwrite a slot that an earlier new query
  still needs, so attend over [old cache ++ new tokens] first and write afterwards.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtx import kernels, sharding
from jaxtx.config import ModelConfig
from jaxtx.kernels.dispatch import select_backend
from jaxtx.layers.common import Dense, constrain, dtype_of
from jaxtx.layers.positions import apply_rope


def quantize_int8(x, axis=-1):
    """Symmetric int8 with one float32 scale per vector along `axis` (per token per head for K/V)."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=axis) / 127.0
    q = jnp.round(xf / jnp.expand_dims(jnp.where(scale == 0, 1.0, scale), axis))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def _sharded_kernel(cfg: ModelConfig, q, k, bias):
    """kernels.attention, wrapped in shard_map when it will run a Pallas/cuDNN kernel under a multi-device mesh.

    Pallas (Mosaic/Triton) and cuDNN calls are single-device and cannot be partitioned by GSPMD; the XLA and blockwise
    paths are plain jnp and are partitioned like the rest of the model, so they stay unwrapped.
    """
    backend = cfg.attention_backend
    if backend == "auto":
        backend = select_backend(q, k, bias=bias)
    if backend in ("pallas_tpu", "pallas_gpu", "cudnn"):
        return sharding.shard_map_attention(kernels.attention)  # unchanged without an active multi-device mesh
    return kernels.attention


class Attention(nn.Module):
    cfg: ModelConfig
    causal: bool = True
    cross: bool = False  # keys/values come from the encoder output

    @nn.compact
    def __call__(self, x_BTD, ctx: dict, cache: dict | None = None):
        """x [B, T, D] -> ([B, T, D], updated layer cache or None). `ctx` carries what all layers share."""
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        H, K = cfg.n_heads, cfg.kv_heads

        def proj(name, inp, n, axes):
            return Dense(cfg, (cfg.d_model, n, cfg.hd), ("embed",) + axes, "BTD,DNh->BTNh", 1, cfg.qkv_bias,
                         name=name)(inp)

        q = proj("q", x_BTD, H, ("heads", "head_dim"))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        new_cache = cache
        if self.cross:
            if cache is not None and cache.get("cross_k") is not None:
                k, v = cache["cross_k"].astype(dt), cache["cross_v"].astype(dt)
            else:
                enc = ctx["enc"]
                k = proj("k", enc, K, ("kv_heads", "head_dim"))
                v = proj("v", enc, K, ("kv_heads", "head_dim"))
                if cache is not None:
                    new_cache = dict(cache, cross_k=k, cross_v=v)
            attn = _sharded_kernel(cfg, q, k, None)
            o = attn(q, k, v, causal=False, segment_ids=jnp.ones(q.shape[:2], jnp.int32),
                     kv_segment_ids=ctx["enc_mask"], softmax_scale=cfg.softmax_scale, backend=cfg.attention_backend)
        else:
            k = proj("k", x_BTD, K, ("kv_heads", "head_dim"))
            v = proj("v", x_BTD, K, ("kv_heads", "head_dim"))
            if ctx.get("rope") is not None:
                cos, sin = ctx["rope"]
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
            if cache is None:
                attn = _sharded_kernel(cfg, q, k, ctx.get("bias"))
                o = attn(q, k, v, causal=self.causal, window=cfg.window, segment_ids=ctx.get("segment_ids"),
                         kv_segment_ids=ctx.get("kv_segment_ids"), alibi_slopes=ctx.get("alibi"), bias=ctx.get("bias"),
                         softmax_scale=cfg.softmax_scale, backend=cfg.attention_backend)
            else:
                o, new_cache = self._cached(q, k, v, ctx, cache)
        out = Dense(cfg, (H, cfg.hd, cfg.d_model), ("heads", "head_dim", "embed"), "BTHh,HhD->BTD", 2, cfg.out_bias,
                    name="o")(o)
        return out, new_cache

    def _cached(self, q, k_BTKh, v_BTKh, ctx, cache):
        cfg = self.cfg
        B, T = q.shape[:2]
        quant = cache["k"].dtype == jnp.int8
        if quant:
            k_new, ks_new = quantize_int8(k_BTKh)  # [B, T, K, Hd], [B, T, K]
            v_new, vs_new = quantize_int8(v_BTKh)
        else:
            k_new, v_new = k_BTKh.astype(cache["k"].dtype), v_BTKh.astype(cache["v"].dtype)
        rows = jnp.arange(B)[:, None]
        idx = ctx["write_idx"]  # [B, T]; == S means "do not write"
        i = cache.get("layer")  # None: the arrays are this layer's own

        def write(c, new):  # c [(L,) B, K, S, ...]; new [B, T, K, ...]: mixed indexing puts [B, T] first
            at = c.at[rows, :, idx] if i is None else c.at[i, rows, :, idx]
            return at.set(new, mode="drop")

        def layer(c):
            return c if c is None or i is None else jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False)

        updated = dict(cache, k=write(cache["k"], k_new), v=write(cache["v"], v_new))
        if quant:
            updated["k_scale"] = write(cache["k_scale"], ks_new)
            updated["v_scale"] = write(cache["v_scale"], vs_new)
        kw = dict(q_positions=ctx["positions"], window=cfg.window, alibi_slopes=ctx.get("alibi"),
                  bias=ctx.get("bias"), softmax_scale=cfg.softmax_scale)
        if cfg.window is not None and T > 1:  # ring-buffer prefill (static: config and shapes)
            t = lambda a: jnp.swapaxes(a, 1, 2)  # [B, T, K, ...] -> [B, K, T, ...]
            cat = lambda old, new: jnp.concatenate([old, t(new)], axis=2)
            o = kernels.decode_attention(
                q, cat(layer(cache["k"]), k_new), cat(layer(cache["v"]), v_new), kv_positions=ctx["kv_pos_concat"],
                k_scale=cat(layer(cache["k_scale"]), ks_new) if quant else None,
                v_scale=cat(layer(cache["v_scale"]), vs_new) if quant else None, **kw)
        else:
            o = kernels.decode_attention(q, layer(updated["k"]), layer(updated["v"]), kv_positions=ctx["kv_pos_new"],
                                         k_scale=layer(updated.get("k_scale")), v_scale=layer(updated.get("v_scale")),
                                         **kw)
        return o, updated
