"""The GPU-style (Triton) Pallas flash kernel, run with interpret=True on CPU, against the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_testutil import (MASK_CASES, check_against_reference, check_mask_case, fresh_key, make_qkv,
                              mask_kwargs)

from jaxtx.kernels import BlockSizes, attention, attention_reference
from jaxtx.kernels.flash_attention.gpu import flash_attention_gpu

BS = BlockSizes(16, 16)  # small tiles: several blocks per sequence even at test sizes


def _gpu(**kw):
    return lambda q, k, v: flash_attention_gpu(q, k, v, block_sizes=BS, interpret=True, **kw)


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_cases_f32(case):
    check_mask_case(_gpu, case)


@pytest.mark.parametrize("shape", [(1, 40, 24, 6, 3, 8), (1, 32, 48, 4, 1, 40)], ids=["gqa3_hd8", "mqa_hd40"])
def test_shapes_gqa_and_odd_head_dim(shape):
    B, T, S, H, K, Hd = shape  # head dims 8 and 40 are padded to Triton-friendly 16 and 64
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    kw = mask_kwargs("causal", key, B, T, S, H)
    check_against_reference(_gpu(**kw), q, k, v, kw)


def test_separate_backward_blocks():
    B, T, S, H, K, Hd = 1, 64, 64, 2, 1, 16
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    kw = mask_kwargs("segments_causal", key, B, T, S, H)
    fn = lambda q, k, v: flash_attention_gpu(q, k, v, block_sizes=BlockSizes(32, 16, 16, 32), interpret=True,  # noqa
                                             **kw)
    check_against_reference(fn, q, k, v, kw)


def test_bf16():
    B, T, S, H, K, Hd = 2, 48, 48, 4, 2, 32
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd, jnp.bfloat16)
    kw = mask_kwargs("causal_window", key, B, T, S, H)
    check_against_reference(_gpu(**kw), q, k, v, kw)


def test_masked_blocks_are_skipped_not_discarded():
    B, T, S, H, K, Hd = 1, 64, 64, 2, 1, 16
    q, k, v = make_qkv(fresh_key(), B, T, S, H, K, Hd)
    seg = jnp.concatenate([jnp.ones((B, 32), jnp.int32), jnp.full((B, 32), 2, jnp.int32)], 1)
    kw = dict(segment_ids=seg, causal=True)
    got = jax.jit(_gpu(**kw))(q, k.at[:, 32:].set(jnp.nan), v.at[:, 32:].set(jnp.nan))[:, :32]
    np.testing.assert_allclose(np.asarray(got), np.asarray(attention_reference(q, k, v, **kw)[:, :32]), atol=1e-5)


def test_fully_masked_rows_zero_and_dispatch_by_name():
    B, T, S, H, K, Hd = 1, 32, 32, 2, 1, 16
    q, k, v = make_qkv(fresh_key(), B, T, S, H, K, Hd)
    kv_pad = jnp.zeros((B, S), jnp.int32).at[:, :5].set(1)
    kw = dict(kv_segment_ids=kv_pad, window=4, causal=True)  # rows >= 8 see no unpadded key inside the window
    f = lambda q_: attention(q_, k, v, backend="pallas_gpu", interpret=True, block_sizes=BS, **kw)  # noqa: E731
    o = jax.jit(f)(q)
    np.testing.assert_array_equal(np.asarray(o[:, 8:]), 0.0)
    dq = jax.jit(jax.grad(lambda q_: jnp.sum(f(q_) ** 2 + f(q_))))(q)
    assert np.isfinite(np.asarray(dq)).all()
    np.testing.assert_array_equal(np.asarray(dq[:, 8:]), 0.0)
    # attention(backend="auto", interpret=True) on CPU is this kernel too
    np.testing.assert_allclose(attention(q, k, v, interpret=True, block_sizes=BS, **kw), o, atol=1e-6)


def test_rejects_non_power_of_two_blocks():
    q, k, v = make_qkv(fresh_key(), 1, 8, 8, 2, 1, 16)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention_gpu(q, k, v, block_sizes=BlockSizes(24, 16), interpret=True)


def test_default_blocks_against_float64_numpy():
    """Default GPU tiles (64 fwd / 32 bwd) with T = 100; forward checked against an independent float64 numpy."""
    from kernels_testutil import numpy_attention_f64

    B, T, S, H, K, Hd = 1, 100, 100, 2, 1, 16
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    kw = dict(causal=True, window=40, alibi_slopes=jnp.array([0.1, 0.3]))
    got = jax.jit(lambda *a: flash_attention_gpu(*a, interpret=True, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), numpy_attention_f64(q, k, v, **kw), atol=2e-5, rtol=2e-5)
    check_against_reference(lambda q_, k_, v_: flash_attention_gpu(q_, k_, v_, interpret=True, **kw), q, k, v, kw)


@pytest.mark.slow
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_matrix_gqa4(case, dtype):
    B, T, S, H, K, Hd = 2, 50, 70, 8, 2, 32
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd, jnp.dtype(dtype))
    kw = mask_kwargs(case, jax.random.fold_in(key, 1), B, T, S, H)
    check_against_reference(_gpu(**kw), q, k, v, kw)
