"""Small shared pieces: dtype lookup, boxed parameter declaration, norms, activations."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtx import quant
from jaxtx.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def dtype_of(name: str):
    return DTYPES[name]


def param(mod: nn.Module, name: str, shape, axes, cfg: ModelConfig, init=None):
    """Declare a parameter once with its shape, logical axes and initializer (normal(init_std) by default).

    The logical axes travel with the value (nn.Partitioned), so shardings derive from this one declaration.
    A quantized weight (jaxtx.quant.QTensor) is returned as is: Flax's shape check would compare its packed values
    with the declared shape; the consumer computes with it (quant.einsum / quant.materialize).
    """
    if mod.has_variable("params", name) and quant.is_quantized(mod.get_variable("params", name)):
        return mod.get_variable("params", name)
    init = nn.initializers.normal(cfg.init_std) if init is None else init
    return mod.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype_of(cfg.param_dtype))


def constrain(x, axes):
    """Logical sharding constraint on an activation (a no-op unless a mesh and rules are in context)."""
    return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
    """y = einsum(eq, x, kernel) (+ bias over the kernel's output dims), in the compute dtype.

    The kernel's first `n_in` dims contract with x; e.g. q: "BTD,DNh->BTNh" with kernel [D, N, Hd] (n_in=1), out:
    "BTHh,HhD->BTD" with kernel [H, Hd, D] (n_in=2), plain: "...i,io->...o".
    """

    cfg: ModelConfig
    shape: tuple
    axes: tuple
    eq: str = "...i,io->...o"
    n_in: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, adapter_ids=None):
        """adapter_ids [batch dims of x] int32: each token's adapter slot when the params hold stacked adapters."""
        dt = dtype_of(self.cfg.dtype)
        w = param(self, "kernel", self.shape, self.axes, self.cfg)
        n_in = self.n_in
        if not quant.is_quantized(w):
            # one 2-D matmul, [rows, in] x [in, out], whatever the kernel's and x's dims. With x's batch dims kept
            # apart, the kernel gradient contracts over two dims (B and T) and XLA:CPU's dot canonicalization
            # transposes the [B, T, F] cotangent to [F, B*T] inside the elementwise fusion that produces it (a
            # strided write: 130 ms per SwiGLU gradient in bench125m, 1.5 s per step); with the kernel's head axes
            # apart, the gradient came out as [N, Hd, D] and was transposed twice more. Reshapes here are bitcasts.
            k_in, k_out = math.prod(self.shape[:n_in]), math.prod(self.shape[n_in:])
            lead = x.shape[:x.ndim - n_in]
            y = jnp.dot(x.reshape(-1, k_in).astype(dt), w.reshape(k_in, k_out).astype(dt))
            y = y.reshape(*lead, *self.shape[n_in:])
        else:
            y = quant.einsum(self.eq, x, w, dt)  # a plain einsum unless the kernel is quantized
        if self.use_bias:
            b = param(self, "bias", self.shape[self.n_in:], self.axes[self.n_in:], self.cfg, nn.initializers.zeros)
            y = y + b.astype(dt)
        if self.has_variable("params", "lora_a"):  # a LoRA adapter beside the kernel (jaxtx.lora)
            from jaxtx.lora.dense import adapter_delta
            y = y + adapter_delta(self, self.eq, self.n_in, x.astype(dt), dt, adapter_ids)
        return y


class Norm(nn.Module):
    """RMSNorm (scale only) or LayerNorm (scale, optional bias), computed in float32 like the references do."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        D = x.shape[-1]
        xf = x.astype(jnp.float32)
        scale = param(self, "scale", (D,), ("embed",), cfg, nn.initializers.ones)
        if cfg.norm == "rmsnorm":
            y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
            y = y * scale.astype(jnp.float32)
        else:
            mean = jnp.mean(xf, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale.astype(jnp.float32)
            if cfg.norm_bias:
                y = y + param(self, "bias", (D,), ("embed",), cfg, nn.initializers.zeros).astype(jnp.float32)
        return y.astype(dtype_of(cfg.dtype))


@jax.custom_vjp
def swiglu(g, u):
    """silu(g) * u, the SwiGLU gate. Autodiff keeps sigmoid(g) and silu(g) alive for the backward and writes them in
    the forward (three [B, T, F] passes where one suffices, seen in bench125m's HLO); this saves only g and u and
    recomputes the sigmoid inside the one elementwise pass that writes both gradients."""
    return jax.nn.silu(g) * u


def _swiglu_fwd(g, u):
    return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dh):
    g, u = res
    # sigmoid through tanh, not the forward's logistic: XLA would CSE the two and keep the forward's sigmoid alive
    s = 0.5 * jnp.tanh(0.5 * g) + 0.5
    return dh * u * s * (1 + g * (1 - s)), dh * (g * s)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def activation(name: str):
    return {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
    }[name]


def dropout(rate: float, x, deterministic: bool, module: nn.Module):
    """Inverted dropout drawing from the module's "dropout" rng; free when the rate is 0 or the call is deterministic.

    Functional (not nn.Dropout) so that setup-style modules can use it from any method.
    """
    if rate == 0.0 or deterministic:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
