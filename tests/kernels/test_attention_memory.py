"""Compiled temp memory vs T: the naive (XLA reference) path grows quadratically, the blockwise flash path linearly.

Numbers come from `jax.jit(...).lower(...).compile().memory_analysis()` of forward+backward (causal, f32). Compile
only, nothing runs. On the dev machine (H=4, K=2, Hd=64): xla 70 / 276 / 1096 MiB, blockwise 23.3 / 24.3 / 26.4 MiB
at T = 1024 / 2048 / 4096.
"""
import jax
import jax.numpy as jnp

from jaxtx.kernels import attention

H, K, Hd = 4, 2, 64


def _grad_temp_bytes(backend, T):
    sds = [jax.ShapeDtypeStruct((1, T, H, Hd), jnp.float32), jax.ShapeDtypeStruct((1, T, K, Hd), jnp.float32),
           jax.ShapeDtypeStruct((1, T, K, Hd), jnp.float32)]
    grad = jax.grad(lambda q, k, v: attention(q, k, v, causal=True, backend=backend).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(*sds).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_linear_for_blockwise_quadratic_for_naive():
    Ts = (1024, 2048, 4096)
    naive = [_grad_temp_bytes("xla", T) for T in Ts]
    flash = [_grad_temp_bytes("blockwise", T) for T in Ts]
    # Increments per doubling of T: x2 for a linear function, x4 for a quadratic one.
    naive_growth = (naive[2] - naive[1]) / (naive[1] - naive[0])
    flash_growth = (flash[2] - flash[1]) / max(1, flash[1] - flash[0])
    assert naive_growth > 3.5, naive
    assert flash_growth < 2.5, flash
    # The [T, S] scores alone are 4 * H * T^2 bytes; the flash path stays far below them.
    assert flash[2] < 4 * H * Ts[2] ** 2 / 8, flash
    assert naive[2] > 10 * flash[2], (naive, flash)
