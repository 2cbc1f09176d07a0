"""The adapter term of a Dense layer: scale * (dropout(x) a) b, read from params that sit beside the kernel.

jaxtx.lora puts `lora_a [in..., r]`, `lora_b [r, out...]` and `lora_scale []` (alpha / r, or alpha / sqrt(r) for
rsLoRA) into the Dense's own param scope; Dense calls `adapter_delta` only when `lora_a` is there, so a plain params
tree runs the plain model and `model.apply` stays the only way in. `lora_dropout []` (a rate) is present only in the
frozen tree a LoRA training run builds, and dropout is drawn only when the call also carries a "dropout" rng (the
objectives pass one in training only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _rank_letter(eq: str) -> str:
    return next(c for c in "rRzZqQ" if c not in eq)


def adapter_equations(eq: str, n_in: int) -> tuple[str, str]:
    """Dense's einsum (x, kernel -> y) split into x, a -> xa and xa, b -> y.

    "BTD,DNh->BTNh" (n_in 1) -> ("BTD,Dr->BTr", "BTr,rNh->BTNh"); "BTHh,HhD->BTD" (n_in 2) -> ("BTHh,Hhr->BTr",
    "BTr,rD->BTD"). The output's trailing letters are the kernel's output dims, the rest are x's batch dims.
    """
    ins, out = eq.split("->")
    x_spec, k_spec = ins.split(",")
    k_in, k_out = k_spec[:n_in], k_spec[n_in:]
    if not out.endswith(k_out):
        raise ValueError(f"Dense eq {eq!r}: LoRA needs the kernel's output dims ({k_out!r}) last in the output")
    batch, r = out[:len(out) - len(k_out)], _rank_letter(eq)
    return f"{x_spec},{k_in}{r}->{batch}{r}", f"{batch}{r},{r}{k_out}->{out}"


def adapter_delta(mod, eq: str, n_in: int, x, dt):
    """scale * (dropout(x) a) b in the compute dtype `dt`, shaped like Dense's output."""
    a = mod.get_variable("params", "lora_a")
    b = mod.get_variable("params", "lora_b")
    scale = mod.get_variable("params", "lora_scale")
    if mod.has_variable("params", "lora_dropout") and mod.has_rng("dropout"):
        rate = jnp.asarray(mod.get_variable("params", "lora_dropout"), jnp.float32)
        keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)
    eq_a, eq_b = adapter_equations(eq, n_in)
    xa = jnp.einsum(eq_a, x, a.astype(dt))
    return jnp.einsum(eq_b, xa, b.astype(dt)) * jnp.asarray(scale).astype(dt)
