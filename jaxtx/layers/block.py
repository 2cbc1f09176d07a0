"""One transformer layer and the stack of L of them (scanned or unrolled, optionally rematerialized).

A residual sub-layer reads as `x = x + f(norm(x))` (pre-norm) or `x = norm(x + f(x))` (post-norm, BERT).
"""
from __future__ import annotations

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


SELF_KEYS = ("k", "v", "k_scale", "v_scale")  # self-attention cache: read and written every step
CROSS_KEYS = ("cross_k", "cross_v")  # cross-attention K/V: computed once (first call), then read-only


class Block(nn.Module):
    """carry = (x [B, T, D], self-attention cache or None, layer index i).

    Scanned: the whole stacked cache [L, ...] rides in the carry and layer i scatters its new tokens straight into it
    (see Attention._cached): as a scan output it would be a second full copy of the cache every decode step, and
    reading layer i's slice out and writing it back made XLA copy the whole stack once per layer. Unrolled: the carry
    holds this layer's own arrays. Read-only cross-attention K/V come in `xs` (this layer's); when they are not cached
    yet they are computed and returned as the output.
    """

    cfg: ModelConfig
    causal: bool = True
    cross: bool = False  # add encoder-decoder cross-attention (T5 decoder)

    @nn.compact
    def __call__(self, carry, xs, ctx, deterministic):
        cfg = self.cfg
        x_BTD, self_cache, i = carry
        cache = None
        if self_cache is not None:
            cache = {**self_cache, **(xs or {})}
            if cfg.scan_layers:
                cache["layer"] = i  # which slice of the stacked arrays is this layer's
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
        x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
        ys = None
        if self_cache is not None:
            self_cache = {n: cache[n] for n in self_cache}
            if self.cross and not xs:
                ys = {n: cache[n] for n in CROSS_KEYS}
        return (x_BTD, self_cache, i + 1), ys


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
    """Apply the stack. `caches`: None, or a dict of per-layer cache fields laid out like the layers (stacked [L, ...]
    arrays for a scanned stack, tuples of L arrays for an unrolled one). Returns (x, caches)."""
    unrolled = isinstance(layers, (list, tuple))
    self_cache = xs = None
    if caches is not None:
        if any(isinstance(a, tuple) != unrolled for a in caches.values()):
            raise ValueError("KV cache layout does not match the model: the layers are "
                             f"{'unrolled' if unrolled else 'scanned'} but the cache is "
                             f"{'stacked' if unrolled else 'per layer'}; build it with KVCache.init(model.cfg, ...)")
        self_cache = {n: a for n, a in caches.items() if n in SELF_KEYS}
        xs = {n: a for n, a in caches.items() if n in CROSS_KEYS} or None
    i0 = jnp.zeros((), jnp.int32)
    if not unrolled:
        (x_BTD, self_cache, _), ys = layers((x_BTD, self_cache, i0), xs, ctx, deterministic)
    else:
        per_layer, outs = [], []
        for j, layer in enumerate(layers):
            own = None if self_cache is None else {n: a[j] for n, a in self_cache.items()}
            (x_BTD, own, _), y = layer((x_BTD, own, i0 + j), None if xs is None else {n: a[j] for n, a in xs.items()},
                                       ctx, deterministic)
            per_layer.append(own)
            outs.append(y)
        if self_cache is not None:
            self_cache = {n: tuple(c[n] for c in per_layer) for n in self_cache}
        ys = None if outs[0] is None else {n: tuple(y[n] for y in outs) for n in outs[0]}
    if caches is None:
        return x_BTD, None
    return x_BTD, {**self_cache, **(xs or {}), **(ys or {})}
