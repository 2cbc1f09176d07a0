"""Multi-head attention (MHA / MQA / GQA), self or cross, with an optional KV cache.

Every call without a cache goes through `jaxtx.kernels.attention`, so the kernel dispatcher picks the fastest correct
path per platform. With a cache the layer hands the cache its new K/V and gets the attention output back
(`cache.attend`, see jaxtx/cache.py): the cache owns its layout (stacked / per layer, contiguous / paged), its dtype,
how it writes (ring buffer, int8) and which kernel reads it. `layer` is the layer's index: a traced scalar in a
scanned stack (the cache scatters straight into its stacked arrays), a Python int in an unrolled one.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxtx import kernels, sharding
from jaxtx.cache import AttentionContext, Cache
from jaxtx.config import ModelConfig
from jaxtx.kernels.dispatch import select_backend
from jaxtx.layers.common import Dense, constrain, dtype_of
from jaxtx.layers.positions import apply_rope


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
    def __call__(self, x_BTD, ctx: AttentionContext, cache: Optional[Cache] = None, layer=None):
        """x [B, T, D] -> ([B, T, D], updated cache or None). `ctx` carries what all layers share."""
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        H, K = cfg.n_heads, cfg.kv_heads

        def proj(name, inp, n, axes, adapter_ids=ctx.adapter_ids):
            return Dense(cfg, (cfg.d_model, n, cfg.hd), ("embed",) + axes, "BTD,DNh->BTNh", 1, cfg.qkv_bias,
                         name=name)(inp, adapter_ids)

        q = proj("q", x_BTD, H, ("heads", "head_dim"))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        if self.cross:
            def encoder_kv():
                return (proj("k", ctx.encoded, K, ("kv_heads", "head_dim"), None),
                        proj("v", ctx.encoded, K, ("kv_heads", "head_dim"), None))
            if cache is None:
                k, v = encoder_kv()
            else:  # computed on the first decode call, then read from the cache
                k, v, cache = cache.cross_kv(layer, encoder_kv)
                k, v = k.astype(dt), v.astype(dt)
            attn = _sharded_kernel(cfg, q, k, None)
            o = attn(q, k, v, causal=False, segment_ids=jnp.ones(q.shape[:2], jnp.int32),
                     kv_segment_ids=ctx.encoded_mask, softmax_scale=cfg.softmax_scale, backend=cfg.attention_backend)
        else:
            k = proj("k", x_BTD, K, ("kv_heads", "head_dim"))
            v = proj("v", x_BTD, K, ("kv_heads", "head_dim"))
            if ctx.rope is not None:
                cos, sin = ctx.rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
            if cache is None:
                attn = _sharded_kernel(cfg, q, k, ctx.bias)
                o = attn(q, k, v, causal=self.causal, window=cfg.window, segment_ids=ctx.segment_ids,
                         kv_segment_ids=ctx.kv_segment_ids, alibi_slopes=ctx.alibi, bias=ctx.bias,
                         softmax_scale=cfg.softmax_scale, backend=cfg.attention_backend)
            else:
                o, cache = cache.attend(layer, q, k, v, ctx, window=cfg.window, softmax_scale=cfg.softmax_scale)
        out = Dense(cfg, (H, cfg.hd, cfg.d_model), ("heads", "head_dim", "embed"), "BTHh,HhD->BTD", 2, cfg.out_bias,
                    name="o")(o, ctx.adapter_ids)
        return out, cache
