"""One transformer layer and the stack of L of them (scanned or unrolled, optionally rematerialized).

A residual sub-layer reads as `x = x + f(norm(x))` (pre-norm) or `x = norm(x + f(x))` (post-norm, BERT).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtx.config import ModelConfig
from jaxtx.layers.attention import Attention
from jaxtx.layers.common import Norm, constrain, dropout
from jaxtx.layers.ffn import Mlp
from jaxtx.layers.moe import MoE

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """carry = (x [B, T, D], cache or None, layer index).

    Scanned: the whole cache (stacked [L, ...] arrays) rides in the carry and layer i writes its new tokens straight
    into it (see KVCache.attend): as a scan output it would be a second full copy of the cache every decode step, and
    reading layer i's slice out and writing it back made XLA copy the whole stack once per layer. The index is then
    the traced carry counter; unrolled blocks know their own index (`index`, a Python int), so the cache can pick its
    per-layer buffer statically.
    """

    cfg: ModelConfig
    causal: bool = True
    cross: bool = False  # add encoder-decoder cross-attention (T5 decoder)
    index: Optional[int] = None  # unrolled: this block's layer index

    @nn.compact
    def __call__(self, carry, ctx, deterministic):
        cfg = self.cfg
        x_BTD, cache, i = carry
        layer = i if self.index is None else self.index
        pre = cfg.norm_position == "pre"

        def residual(x, norm_name, fn):
            h = Norm(cfg, name=norm_name)(x) if pre else x
            y = dropout(cfg.dropout, fn(h), deterministic, self)
            return x + y if pre else Norm(cfg, name=norm_name)(x + y)

        def attn(name, cross):
            def f(h):
                nonlocal cache
                y, cache = Attention(cfg, causal=self.causal, cross=cross, name=name)(h, ctx, cache, layer)
                return y
            return f

        x_BTD = residual(x_BTD, "attn_norm", attn("attn", False))
        if self.cross:
            x_BTD = residual(x_BTD, "cross_norm", attn("cross_attn", True))
        def ffn(h):  # MoE experts take no LoRA (jaxtx.lora refuses them), so only the dense FFN selects adapters
            return MoE(cfg, name="moe")(h) if cfg.is_moe else Mlp(cfg, name="mlp")(h, ctx.adapter_ids)

        x_BTD = residual(x_BTD, "mlp_norm", ffn)
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
        return (x_BTD, cache, None if i is None else i + 1), None


def make_layers(cfg: ModelConfig, n_layers: int, *, causal: bool, cross: bool = False):
    """The L blocks: one scanned module (params stacked on a leading "layers" axis) or a list (layers_0 …)."""
    block = Block
    if cfg.remat != "none":
        # prevent_cse only matters outside scan; under scan it would block useful optimizations.
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                         static_argnums=(3,))
    if not cfg.scan_layers:
        return [block(cfg, causal=causal, cross=cross, index=j) for j in range(n_layers)]
    scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, nn.broadcast),
                      length=n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, causal=causal, cross=cross)


def run_layers(layers, x_BTD, cache, ctx, deterministic):
    """Apply the stack. `cache`: None, or a cache (between begin and end) laid out like the layers (stacked [L, ...]
    arrays for a scanned stack, tuples of L arrays for an unrolled one). Returns (x, cache)."""
    unrolled = isinstance(layers, (list, tuple))
    if cache is not None and cache.stacked == unrolled:
        raise ValueError("KV cache layout does not match the model: the layers are "
                         f"{'unrolled' if unrolled else 'scanned'} but the cache is "
                         f"{'stacked' if unrolled else 'per layer'}; build it with {type(cache).__name__}.init("
                         "model.cfg, ...)")
    if not unrolled:
        (x_BTD, cache, _), _ = layers((x_BTD, cache, jnp.zeros((), jnp.int32)), ctx, deterministic)
    else:
        for layer in layers:
            (x_BTD, cache, _), _ = layer((x_BTD, cache, None), ctx, deterministic)
    return x_BTD, cache
