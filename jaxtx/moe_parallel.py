"""Expert parallelism: tokens travel to the devices that hold their experts with all_to_all inside jax.shard_map.

Layout (mesh axes data, fsdp, tensor, expert; rules from jaxtx.sharding with the `ep` feature):
- tokens [B, T, D] are split over the batch axes (data, fsdp, expert): every device routes its own b = B/(#shards)
  sequences;
- expert weights [E, D, F] / [E, F, D] are split over `expert` on E (E/X local experts per device) and over `tensor`
  on F; the FSDP split of D is gathered at the shard_map boundary (ZeRO-3: weights are whole only while used).

Per device: slot every (token, choice) into a send buffer [E, G*C, D], all_to_all over `expert` so each device receives
the slots of its E/X experts from all X peers, run the expert FFN (TP: partial sums over F), all_to_all back, combine
with the router weights, psum over `tensor`.

Modes, matching jaxtx.layers.moe exactly so EP gives the same numbers as one device:
- capacity (cfg.capacity_factor set): GShard groups are sequences, C = ceil(k*T/E*cf) per sequence, first choices
  before second, in token order — the same slots the single-device `experts_capacity` picks, because every device holds
  whole sequences.
- dropless (capacity_factor None): the device's b*T tokens form one group with C = b*T slots per expert; a token picks
  an expert at most once, so nothing can drop. The buffer is E/k times the routed tokens (padding), the price of a
  static-shape all_to_all; ragged_all_to_all would remove it.
The router (and its load-balancing / z losses) runs outside, under GSPMD, on the global batch: the losses are global.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtx.config import ConfigError, ModelConfig, expert_capacity
from jaxtx.layers.ffn import expert_ffn
from jaxtx.sharding import Rules, _context, logical_to_spec


def ep_active(mesh=None, rules: Rules | None = None) -> bool:
    """True when a mesh in context has an `expert` axis > 1 and the rules put the `expert` dim on it."""
    mesh, rules = _context(mesh, rules)
    if mesh is None or getattr(mesh, "empty", False) or mesh.shape.get("expert", 1) == 1:
        return False
    return "expert" in (logical_to_spec(("expert",), rules, mesh)[0] or ())


def capacity_slots(e_GTk, num_experts: int, C: int):
    """Slot of every (token, choice) within its expert's buffer, choice-major then token order (GShard priority).
    Returns (e_GkT, slot_GkT, keep_GkT); dropped assignments get slot C (out of range)."""
    G, T, k = e_GTk.shape
    e_GkT = jnp.swapaxes(e_GTk, 1, 2)
    onehot = jax.nn.one_hot(e_GkT.reshape(G, k * T), num_experts, dtype=jnp.int32)  # [G, k*T, E]
    pos = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1).reshape(G, k, T)
    keep = pos < C
    return e_GkT, jnp.where(keep, pos, C), keep


def _local(x_GTD, w_GTk, e_GTk, weights, cfg: ModelConfig, C: int, X: int, tensor_axes, expert_fn):
    """One device's part: dispatch -> all_to_all -> local experts -> all_to_all -> combine. Returns (y, kept share)."""
    G, T, D = x_GTD.shape
    E = cfg.num_experts
    El = E // X
    e_GkT, slot, keep = capacity_slots(e_GTk, E, C)
    g = jnp.arange(G)[:, None, None]
    t = jnp.broadcast_to(jnp.arange(T)[None, None, :], e_GkT.shape)
    send = jnp.zeros((E, G, C, D), x_GTD.dtype).at[e_GkT, g, slot].set(x_GTD[g, t], mode="drop")
    # Experts are split over `expert` in contiguous blocks, so rows [i*El, (i+1)*El) go to device i.
    send = send.reshape(X, El, G * C, D)
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [X sources, El, G*C, D]
    h = jnp.swapaxes(recv, 0, 1).reshape(El, X * G * C, D)
    y = expert_fn(h, weights, cfg, lambda a, W: jnp.einsum("ECi,Eio->ECo", a, W))
    y = jnp.swapaxes(y.reshape(El, X, G * C, D), 0, 1)
    back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True).reshape(E, G, C, D)  # my tokens, every expert
    got = back[e_GkT, g, jnp.minimum(slot, C - 1)]  # [G, k, T, D]
    got = jnp.where(keep[..., None], got, 0)
    out = jnp.einsum("GkTD,GkT->GTD", got, jnp.swapaxes(w_GTk, 1, 2).astype(got.dtype))
    if tensor_axes:  # F was split: each tensor rank holds a partial sum (combine is linear, so psum once, here)
        out = jax.lax.psum(out, tensor_axes)
    return out, jnp.mean(keep.astype(jnp.float32))[None]


def dispatch_combine(x_BTD, w_BTk, e_BTk, weights: dict, cfg: ModelConfig, mesh=None, rules: Rules | None = None,
                     expert_fn=expert_ffn):
    """Expert-parallel MoE FFN. x [B,T,D], router weights w [B,T,k] (renormalized), expert ids e [B,T,k], weights
    {"wi_gate"|"wi_up"|"wi": [E,D,F], "wo": [E,F,D]}. Returns (y [B,T,D], dropped_fraction scalar).
    Must run with a mesh in context (jaxtx.sharding.use_mesh) where ep_active() holds."""
    mesh, rules = _context(mesh, rules)
    X = mesh.shape["expert"]
    B, T, D = x_BTD.shape
    E = cfg.num_experts
    if E % X:
        raise ConfigError(f"expert parallelism: num_experts={E} is not divisible by mesh axis expert={X}")
    bspec = logical_to_spec(("batch",), rules, mesh)[0]
    baxes = () if bspec is None else (bspec,) if isinstance(bspec, str) else tuple(bspec)
    if "expert" not in baxes:
        raise ConfigError(f"expert parallelism: the batch rule {baxes} must include the 'expert' axis so each expert "
                          "rank routes its own tokens")
    n_shards = math.prod(mesh.shape[a] for a in baxes)
    if B % n_shards:
        raise ConfigError(f"expert parallelism: batch {B} is not divisible by the {n_shards} token shards {baxes}")
    mlp = logical_to_spec(("mlp",), rules, mesh)[0]
    tensor_axes = () if mlp is None else (mlp,) if isinstance(mlp, str) else tuple(mlp)
    wspec = {n: P("expert", None, mlp) if n != "wo" else P("expert", mlp, None) for n in weights}
    tok = P(bspec, None, None)

    if cfg.capacity_factor is None:
        b = B // n_shards
        C = b * T

        def body(x, w, e, wts):  # one group of all local tokens
            y, kept = _local(x.reshape(1, b * T, D), w.reshape(1, b * T, -1), e.reshape(1, b * T, -1), wts, cfg,
                             C, X, tensor_axes, expert_fn)
            return y.reshape(b, T, D), kept
    else:
        C = expert_capacity(cfg, T)

        def body(x, w, e, wts):  # groups = sequences, as in the single-device path
            return _local(x, w, e, wts, cfg, C, X, tensor_axes, expert_fn)

    y, kept = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, wspec), out_specs=(tok, P(bspec)),
                            check_vma=True)(x_BTD, w_BTk, e_BTk, weights)
    return y, 1.0 - jnp.mean(kept)
