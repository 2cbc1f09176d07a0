"""Mixture of experts: softmax router -> top-k -> renormalize (Mixtral), dropless or capacity-limited dispatch.

The layer sows, per layer, into the "intermediates" collection:
- router_aux_loss: Switch/GShard load balance E * sum_e f_e * P_e (f_e: share of the k*N assignments sent to expert e,
  P_e: mean router probability of e); 1.0 when perfectly balanced.
- router_z_loss: mean over tokens of logsumexp(router logits)^2 (ST-MoE).
- dropped_fraction: share of assignments dropped for lack of capacity (0 in dropless mode).
`jaxtx.model.moe_aux_loss` weights and sums them.

The expert computation is split into pure functions of (tokens, assignments, weights). The expert-parallel path
(jaxtx.moe_parallel, which this layer calls when an `expert` mesh axis is active) runs the same pieces on each device's
shard: the expert FFN (jaxtx.layers.ffn.expert_ffn) and the capacity slotting (moe_parallel.capacity_slots). Imports
flow one way: this layer -> moe_parallel -> layers.ffn.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtx import moe_parallel, quant
from jaxtx.config import ModelConfig, expert_capacity
from jaxtx.layers.common import constrain, dtype_of, param
from jaxtx.layers.ffn import expert_ffn


def route(logits_NE, k: int):
    """Top-k experts per token with renormalized softmax weights. Returns (probs [N,E], w [N,k], e [N,k])."""
    probs = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    w, e = jax.lax.top_k(probs, k)
    return probs, w / jnp.sum(w, axis=-1, keepdims=True), e


def router_losses(logits_NE, probs_NE, e_Nk, num_experts: int):
    """(load-balance loss, z-loss) over the tokens given. Balanced routing gives a load-balance loss of 1."""
    f = jnp.mean(jax.nn.one_hot(e_Nk, num_experts, dtype=jnp.float32), axis=(0, 1))  # share of assignments
    aux = num_experts * jnp.sum(f * jnp.mean(probs_NE, axis=0))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)))
    return aux, z


def experts_dropless(x_ND, w_Nk, e_Nk, weights, cfg: ModelConfig):
    """Every assignment is computed: sort the k*N (token, expert) pairs by expert and run one ragged matmul per layer
    (lax.ragged_dot, megablox style). Returns ([N, D], dropped_fraction=0)."""
    N, D = x_ND.shape
    k = e_Nk.shape[1]
    flat_e = e_Nk.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # [N*k]
    x_sorted = x_ND[order // k]
    sizes = jnp.bincount(flat_e, length=cfg.num_experts).astype(jnp.int32)
    y_sorted = expert_ffn(x_sorted, weights, cfg, lambda a, W: jax.lax.ragged_dot(a, W, sizes))
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(N, k, D)
    return jnp.einsum("NkD,Nk->ND", y, w_Nk.astype(y.dtype)), jnp.zeros((), jnp.float32)


def experts_capacity(x_GTD, w_GTk, e_GTk, weights, cfg: ModelConfig):
    """GShard dispatch per group G (a sequence): each expert takes at most C = ceil(k*T/E*cf) assignments, first
    choices before second choices, in token order; the rest are dropped (their expert output is 0).
    Returns ([G, T, D], dropped_fraction)."""
    G, T, D = x_GTD.shape
    k, E = e_GTk.shape[-1], cfg.num_experts
    C = expert_capacity(cfg, T)
    e_GkT, slot, keep = moe_parallel.capacity_slots(e_GTk, E, C)  # the EP path slots the same way
    g = jnp.arange(G)[:, None, None]
    t = jnp.broadcast_to(jnp.arange(T)[None, None, :], (G, k, T))
    # a dropped assignment's slot C is out of range: mode="drop" skips it
    buf = jnp.zeros((G, E, C, D), x_GTD.dtype).at[g, e_GkT, slot].set(x_GTD[g, t], mode="drop")
    buf = constrain(buf, ("batch", "expert", "capacity", "embed"))
    y_buf = expert_ffn(buf, weights, cfg, lambda a, W: jnp.einsum("GECi,Eio->GECo", a, W))
    y = jnp.where(keep[..., None], y_buf[g, e_GkT, jnp.minimum(slot, C - 1)], 0)  # [G, k, T, D]
    out = jnp.einsum("GkTD,GkT->GTD", y, jnp.swapaxes(w_GTk, 1, 2).astype(y.dtype))
    return out, 1.0 - jnp.mean(keep.astype(jnp.float32))


class MoE(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        B, T, D = x_BTD.shape
        E, F, k = cfg.num_experts, cfg.d_ff, cfg.experts_per_token
        router = param(self, "router", (D, E), ("embed", "expert"), cfg)
        names = ["wi_gate", "wi_up"] if cfg.gated else ["wi"]
        # quantized experts are dequantized whole (ragged_dot and the EP all_to_all take plain arrays)
        weights = {n: quant.materialize(param(self, n, (E, D, F), ("expert", "embed", "mlp"), cfg), dt) for n in names}
        weights["wo"] = quant.materialize(param(self, "wo", (E, F, D), ("expert", "mlp", "embed"), cfg), dt)

        x = x_BTD.astype(dt)
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), router.astype(jnp.float32))
        probs, w, e = route(logits.reshape(B * T, E), k)
        aux, z = router_losses(logits.reshape(B * T, E), probs, e, E)
        if moe_parallel.ep_active():  # an `expert` mesh axis is in context: all_to_all dispatch (both modes)
            y, dropped = moe_parallel.dispatch_combine(x, w.reshape(B, T, k), e.reshape(B, T, k), weights, cfg)
        elif cfg.capacity_factor is None:
            y, dropped = experts_dropless(x.reshape(B * T, D), w, e, weights, cfg)
            y = y.reshape(B, T, D)
        else:
            y, dropped = experts_capacity(x, w.reshape(B, T, k), e.reshape(B, T, k), weights, cfg)
        self.sow("intermediates", "router_aux_loss", aux)
        self.sow("intermediates", "router_z_loss", z)
        self.sow("intermediates", "dropped_fraction", dropped)
        return y.astype(dt)
