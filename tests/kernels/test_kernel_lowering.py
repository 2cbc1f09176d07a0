"""Lowering proofs without the hardware: Triton (cuda) lowering of the GPU kernels, Mosaic AOT compile for TPU."""
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from jaxtx.kernels.flash_attention.gpu import flash_attention_gpu

B, T, S, H, K, Hd = 2, 256, 256, 8, 2, 64


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("case", ["causal_window_alibi_segments", "plain_f32"])
def test_gpu_flash_fwd_and_bwd_lower_to_triton(case):
    dtype = jnp.float32 if case == "plain_f32" else jnp.bfloat16
    masked = case != "plain_f32"

    def loss(q, k, v, seg):
        o = flash_attention_gpu(q, k, v, causal=masked, window=100 if masked else None,
                                segment_ids=seg if masked else None,
                                alibi_slopes=jnp.linspace(0.1, 1.0, H) if masked else None)
        return o.astype(jnp.float32).sum()

    args = (_sds((B, T, H, Hd), dtype), _sds((B, S, K, Hd), dtype), _sds((B, S, K, Hd), dtype),
            _sds((B, T), jnp.int32))
    fwd = jax.jit(loss).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "jaxtx_flash_fwd" in fwd and "__gpu$xla.gpu.triton" in fwd
    for name in ("jaxtx_flash_fwd", "jaxtx_flash_bwd_dkdv", "jaxtx_flash_bwd_dq"):
        assert name in bwd, name
    assert bwd.count("__gpu$xla.gpu.triton") == 3
