"""Dense feed-forward: act(x W_i) W_o, or gated act(x W_gate) * (x W_up) W_o (SwiGLU with silu, GeGLU with gelu)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxtx.config import ModelConfig
from jaxtx.layers.common import activation, constrain, dtype_of, param


class Linear(nn.Module):
    """x [..., N_in] @ kernel [N_in, N_out] (+ bias), in the compute dtype."""

    cfg: ModelConfig
    n_out: int
    axes: tuple  # logical axes of the kernel
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        w = param(self, "kernel", (x.shape[-1], self.n_out), self.axes, cfg)
        y = jnp.einsum("...i,io->...o", x.astype(dt), w.astype(dt))
        if self.use_bias:
            y = y + param(self, "bias", (self.n_out,), self.axes[1:], cfg, nn.initializers.zeros).astype(dt)
        return y


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        act = activation(cfg.activation)
        up_axes, down_axes = ("embed", "mlp"), ("mlp", "embed")
        if cfg.gated:
            h = act(Linear(cfg, cfg.d_ff, up_axes, cfg.mlp_bias, name="wi_gate")(x_BTD)) \
                * Linear(cfg, cfg.d_ff, up_axes, cfg.mlp_bias, name="wi_up")(x_BTD)
        else:
            h = act(Linear(cfg, cfg.d_ff, up_axes, cfg.mlp_bias, name="wi")(x_BTD))
        h = constrain(h, ("batch", "length", "mlp"))
        return Linear(cfg, cfg.d_model, down_axes, cfg.mlp_bias, name="wo")(h)
