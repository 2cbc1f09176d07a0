"""Dense feed-forward: act(x W_i) W_o, or gated act(x W_gate) * (x W_up) W_o (SwiGLU with silu, GeGLU with gelu)."""
from __future__ import annotations

import flax.linen as nn

from jaxtx.config import ModelConfig
from jaxtx.layers.common import Dense, activation, constrain, swiglu


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, adapter_ids=None):
        """adapter_ids [B, T] int32: each token's adapter slot (stacked LoRA adapters, see jaxtx.lora.dense)."""
        cfg = self.cfg
        act = activation(cfg.activation)
        D, F = cfg.d_model, cfg.d_ff

        def up(name):
            return Dense(cfg, (D, F), ("embed", "mlp"), use_bias=cfg.mlp_bias, name=name)(x_BTD, adapter_ids)

        if cfg.gated:
            h = swiglu(up("wi_gate"), up("wi_up")) if cfg.activation == "silu" else act(up("wi_gate")) * up("wi_up")
        else:
            h = act(up("wi"))
        h = constrain(h, ("batch", "length", "mlp"))
        return Dense(cfg, (F, D), ("mlp", "embed"), use_bias=cfg.mlp_bias, name="wo")(h, adapter_ids)


def expert_ffn(x, w, cfg: ModelConfig, matmul):
    """The same FFN for the E experts of a MoE layer, weights held as arrays {"wi_gate"|"wi_up"|"wi": [E, D, F],
    "wo": [E, F, D]}; `matmul(x, W[E, in, out])` does the grouping (ragged_dot, or a batched einsum over capacity
    buffers). Here, not in layers/moe.py, so that jaxtx.moe_parallel can run it without importing the layer."""
    act = activation(cfg.activation)
    if cfg.gated:
        h = act(matmul(x, w["wi_gate"])) * matmul(x, w["wi_up"])
    else:
        h = act(matmul(x, w["wi"]))
    return matmul(h, w["wo"])
