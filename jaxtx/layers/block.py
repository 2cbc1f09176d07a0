"""One transformer layer and the stack of L of them (scanned or unrolled, optionally rematerialized).

A residual sub-layer reads as `x = x + f(norm(x))` (pre-norm) or `x = norm(x + f(x))` (post-norm, BERT).
"""
from __future__ import annotations

import flax.linen as nn
import jax

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
    cfg: ModelConfig
    causal: bool = True
    cross: bool = False  # add encoder-decoder cross-attention (T5 decoder)

    @nn.compact
    def __call__(self, x_BTD, cache, ctx, deterministic):
        cfg = self.cfg
        pre = cfg.norm_position == "pre"

        def residual(x, norm_name, fn):
            h = Norm(cfg, name=norm_name)(x) if pre else x
            y = dropout(cfg.dropout, fn(h), deterministic, self)
            return x + y if pre else Norm(cfg, name=norm_name)(x + y)

        def attn(name, cross):
            def f(h):
                nonlocal cache
                y, cache = Attention(cfg, causal=self.causal, cross=cross, name=name)(h, ctx, cache)
                return y
            return f

        x_BTD = residual(x_BTD, "attn_norm", attn("attn", False))
        if self.cross:
            x_BTD = residual(x_BTD, "cross_norm", attn("cross_attn", True))
        ffn = MoE(cfg, name="moe") if cfg.is_moe else Mlp(cfg, name="mlp")
        x_BTD = residual(x_BTD, "mlp_norm", ffn)
        return constrain(x_BTD, ("batch", "length", "embed")), cache


def make_layers(cfg: ModelConfig, n_layers: int, *, causal: bool, cross: bool = False):
    """The L blocks: one scanned module (params stacked on a leading "layers" axis) or a list (layers_0 …)."""
    block = Block
    if cfg.remat != "none":
        # prevent_cse only matters outside scan; under scan it would block useful optimizations.
        block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                         static_argnums=(4,))
    if not cfg.scan_layers:
        return [block(cfg, causal=causal, cross=cross) for _ in range(n_layers)]
    scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(0, nn.broadcast, nn.broadcast),
                      length=n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, causal=causal, cross=cross)


def run_layers(layers, x_BTD, caches, ctx, deterministic):
    """Apply the stack; `caches` is a dict of per-layer arrays stacked on axis 0 (or None)."""
    if not isinstance(layers, (list, tuple)):
        return layers(x_BTD, caches, ctx, deterministic)
    outs = []
    for i, layer in enumerate(layers):
        c = None if caches is None else jax.tree.map(lambda a: a[i], caches)
        x_BTD, c = layer(x_BTD, c, ctx, deterministic)
        outs.append(c)
    if caches is None:
        return x_BTD, None
    return x_BTD, jax.tree.map(lambda *a: jax.numpy.stack(a), *outs)
