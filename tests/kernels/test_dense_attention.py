"""The short-sequence CPU path (kernels/flash_attention/dense.py, the hand-written backward) against the autodiff of
the reference, over the mask cases, GQA ratios, bf16 and fully masked rows; and the dispatcher sending `xla` there."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_testutil import (MASK_CASES, check_against_reference, check_mask_case, fresh_key, make_qkv, mask_kwargs,
                              numpy_attention_f64)

from jaxtx.kernels import attention
from jaxtx.kernels.flash_attention.dense import dense_attention


def _dense(**kw):
    return lambda q, k, v: dense_attention(q, k, v, **kw)


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_cases_f32(case):
    check_mask_case(_dense, case)


@pytest.mark.parametrize("shape", [(1, 24, 24, 4, 1, 32), (2, 20, 12, 6, 3, 8), (2, 16, 16, 2, 2, 16)],
                         ids=["mqa", "gqa3_T>S", "mha"])
def test_gqa_shapes_causal(shape):
    B, T, S, H, K, Hd = shape
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    check_against_reference(_dense(causal=True, softmax_scale=0.3), q, k, v, dict(causal=True, softmax_scale=0.3))


def test_bf16():
    B, T, S, H, K, Hd = 2, 32, 32, 4, 2, 32
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd, jnp.bfloat16)
    kw = mask_kwargs("segments_causal", jax.random.fold_in(key, 1), B, T, S, H)
    check_against_reference(_dense(**kw), q, k, v, kw)


def test_matches_float64_numpy_and_masked_rows_are_zero():
    B, T, S, H, K, Hd = 2, 17, 17, 4, 2, 8
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    seg = jnp.asarray(np.r_[np.ones(9), np.full(8, 2)][None].repeat(B, 0).astype(np.int32))
    kv_seg = seg.at[:, 9:].set(3)  # queries of segment 2 see no key
    kw = dict(causal=True, segment_ids=seg, kv_segment_ids=kv_seg, alibi_slopes=jnp.linspace(0.1, 0.4, H))
    got = np.asarray(dense_attention(q, k, v, **kw))
    np.testing.assert_allclose(got, numpy_attention_f64(q, k, v, **kw), atol=2e-5, rtol=2e-5)
    assert np.all(got[:, 9:] == 0)
    g = jax.grad(lambda q, k, v: dense_attention(q, k, v, **kw).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in g) and np.all(np.asarray(g[0])[:, 9:] == 0)


def test_xla_backend_runs_the_dense_path_without_bias():
    q, k, v = make_qkv(fresh_key(), 1, 16, 16, 4, 2, 8)
    jaxpr = str(jax.make_jaxpr(lambda q: attention(q, k, v, causal=True, backend="xla"))(q))
    assert "custom_vjp_call" in jaxpr
    bias = jnp.ones((1, 4, 16, 16))
    jaxpr = str(jax.make_jaxpr(lambda q: attention(q, k, v, bias=bias, backend="xla"))(q))
    assert "custom_vjp_call" not in jaxpr  # a bias takes the reference (its gradient is autodiff's)
