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


def _adapter_letter(eq: str) -> str:
    return next(c for c in "aAyYxX" if c not in eq)


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


def stacked_equations(eq: str, n_in: int) -> tuple[str, str]:
    """adapter_equations with a leading adapter dim on a and b, kept on xa: "BTD,DNh->BTNh" -> ("BTD,aDr->BTar",
    "BTar,arNh->BTNh"). The second contracts over (adapter, rank) together, so one matmul adds the selected term."""
    eq_a, eq_b = adapter_equations(eq, n_in)
    s = _adapter_letter(eq + eq_a)
    (x_spec, a_spec), xa = eq_a.split("->")[0].split(","), eq_a.split("->")[1]
    (_, b_spec), out = eq_b.split("->")[0].split(","), eq_b.split("->")[1]
    xa_s = xa[:-1] + s + xa[-1]
    return f"{x_spec},{s}{a_spec}->{xa_s}", f"{xa_s},{s}{b_spec}->{out}"


def selected_delta(eq: str, n_in: int, x, a, b, scale, adapter_ids, dt):
    """Each token's own adapter term from stacked adapters: a [A, in..., r], b [A, r, out...], scale [A],
    adapter_ids [batch dims of x] int32 (slot 0 is the zero adapter: the base alone).

    One-hot selection: x is multiplied by every adapter's `a` (A * r columns per token, small next to the kernel's
    out columns), the rows of the other adapters are zeroed, and one contraction over (adapter, rank) with the
    stacked `b` adds the selected term. Zeroing before the second matmul makes every other adapter contribute exact
    zeros, so a token's output is its single adapter's (x a) b, times its scale afterwards as adapter_delta does.
    Why not gather each token's a and b ([N, in, r] + [N, r, out] copies, then per-token matvecs) or group tokens
    with lax.ragged_dot: measured on CPU (docs/benchmarks.md, many adapters in one batch) one-hot is fastest up to
    ~9 slots (10x over gathering at 256 tokens and 3 slots); gathering wins only with many slots (16 tokens, 33
    slots: 5x); ragged_dot never wins on XLA:CPU. One-hot is two dense matmuls (what MXUs and tensor cores want)
    and its extra work is A * r columns per token, so it suits up to a few dozen adapters."""
    eq_a, eq_b = stacked_equations(eq, n_in)
    A = a.shape[0]
    onehot = jax.nn.one_hot(adapter_ids, A, dtype=dt)  # [batch..., A]; an id outside [0, A) selects nothing
    xa = jnp.einsum(eq_a, x, a.astype(dt)) * onehot[..., None]
    y = jnp.einsum(eq_b, xa, b.astype(dt))
    s = jnp.take(jnp.asarray(scale, jnp.float32), jnp.clip(adapter_ids, 0, A - 1)).astype(dt)
    return y * s.reshape(s.shape + (1,) * (y.ndim - s.ndim))


def adapter_delta(mod, eq: str, n_in: int, x, dt, adapter_ids=None):
    """scale * (dropout(x) a) b in the compute dtype `dt`, shaped like Dense's output.

    Stacked adapters (lora_scale [A], from jaxtx.lora.stack_adapters) need adapter_ids: each token gets its own."""
    a = mod.get_variable("params", "lora_a")
    b = mod.get_variable("params", "lora_b")
    scale = mod.get_variable("params", "lora_scale")
    if jnp.ndim(scale) == 1:
        if adapter_ids is None:
            where = "/".join(map(str, mod.scope.path))
            raise ValueError(f"{where}: the params hold {scale.shape[0]} stacked LoRA adapters "
                             "(jaxtx.lora.stack_adapters); pass adapter_ids=[B, T] slots to model.apply (0 = base)")
        return selected_delta(eq, n_in, x, a, b, scale, adapter_ids, dt)
    if mod.has_variable("params", "lora_dropout") and mod.has_rng("dropout"):
        rate = jnp.asarray(mod.get_variable("params", "lora_dropout"), jnp.float32)
        keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)
    eq_a, eq_b = adapter_equations(eq, n_in)
    xa = jnp.einsum(eq_a, x, a.astype(dt))
    return jnp.einsum(eq_b, xa, b.astype(dt)) * jnp.asarray(scale).astype(dt)
