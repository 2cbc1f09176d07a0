"""The blockwise (lax-loop) flash attention and the `attention` dispatcher on CPU, against the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_testutil import (MASK_CASES, check_against_reference, check_mask_case, fresh_key, make_qkv, mask_kwargs,
                              numpy_attention_f64)

from jaxtx.kernels import BlockSizes, attention, attention_reference, blockwise_attention, select_backend

BS = BlockSizes(16, 16)


def _blockwise(**kw):
    return lambda q, k, v: blockwise_attention(q, k, v, block_sizes=BS, **kw)


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_cases_f32(case):
    check_mask_case(_blockwise, case)


@pytest.mark.parametrize("shape,case", [((1, 64, 64, 4, 1, 32), "causal"), ((1, 40, 24, 6, 3, 8), "segments_causal"),
                                        ((3, 16, 70, 2, 2, 16), "causal")], ids=["mqa", "gqa3_T>S", "mha_S>T"])
def test_shapes(shape, case):
    B, T, S, H, K, Hd = shape
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    kw = mask_kwargs(case, jax.random.fold_in(key, 1), B, T, S, H)
    check_against_reference(_blockwise(**kw), q, k, v, kw)


@pytest.mark.parametrize("case", ["causal_window", "segments_causal"])
def test_bf16(case):
    B, T, S, H, K, Hd = 2, 48, 48, 4, 2, 32
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd, jnp.bfloat16)
    kw = mask_kwargs(case, jax.random.fold_in(key, 1), B, T, S, H)
    check_against_reference(_blockwise(**kw), q, k, v, kw)


def test_matches_float64_numpy():
    B, T, S, H, K, Hd = 2, 33, 33, 4, 2, 16
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    kw = mask_kwargs("segments_causal", jax.random.fold_in(key, 1), B, T, S, H)
    kw["alibi_slopes"] = jnp.linspace(0.1, 0.4, H)
    got = np.asarray(blockwise_attention(q, k, v, block_sizes=BS, **kw))
    np.testing.assert_allclose(got, numpy_attention_f64(q, k, v, **kw), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bias_shape", ["1H", "B1"])
def test_bias_and_its_gradient(bias_shape):
    B, T, S, H, K, Hd = 2, 30, 20, 4, 2, 8
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    bshape = (1, H, T, S) if bias_shape == "1H" else (B, 1, T, S)
    bias = jax.random.normal(jax.random.fold_in(key, 7), bshape)
    ct = jax.random.normal(jax.random.fold_in(key, 8), q.shape)

    def loss(fn, q, k, v, b):
        return jnp.sum(fn(q, k, v, bias=b, causal=True, softmax_scale=1.0) * ct)

    got = jax.jit(jax.grad(lambda *a: loss(lambda *x, **y: blockwise_attention(*x, block_sizes=BS, **y), *a),
                           argnums=(0, 1, 2, 3)))(q, k, v, bias)
    want = jax.jit(jax.grad(lambda *a: loss(attention_reference, *a), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)
    assert float(jnp.abs(got[3]).max()) > 0  # the bias gradient is really computed


def test_fully_masked_rows_are_zero_with_zero_finite_grads():
    B, T, S, H, K, Hd = 1, 32, 32, 2, 1, 16
    q, k, v = make_qkv(fresh_key(), B, T, S, H, K, Hd)
    seg = jnp.concatenate([jnp.ones((B, 16), jnp.int32), jnp.full((B, 16), 2, jnp.int32)], 1)
    kv_seg = jnp.ones((B, S), jnp.int32)  # no key has segment 2: rows 16.. see nothing
    kw = dict(segment_ids=seg, kv_segment_ids=kv_seg, causal=True)
    for backend in ("xla", "blockwise"):
        f = lambda q_, k_, v_: attention(q_, k_, v_, backend=backend, block_sizes=BS, **kw)  # noqa: E731
        o = jax.jit(f)(q, k, v)
        np.testing.assert_array_equal(np.asarray(o[:, 16:]), 0.0)
        dq = jax.jit(jax.grad(lambda q_: jnp.sum(f(q_, k, v) ** 2 + f(q_, k, v))))(q)
        assert np.isfinite(np.asarray(dq)).all()
        np.testing.assert_array_equal(np.asarray(dq[:, 16:]), 0.0)
        assert float(jnp.abs(dq[:, :16]).max()) > 0


@pytest.mark.parametrize("kind", ["causal", "segments"])
def test_masked_blocks_are_skipped_not_discarded(kind):
    """NaN in keys/values that only fully-masked blocks touch: a kernel that computes and discards those blocks
    returns NaN (0 * NaN); one that skips them returns the reference on the visible part."""
    B, T, S, H, K, Hd = 1, 64, 64, 2, 1, 16
    q, k, v = make_qkv(fresh_key(), B, T, S, H, K, Hd)
    if kind == "causal":
        kw, rows = dict(causal=True), slice(0, 48)
    else:
        seg = jnp.concatenate([jnp.ones((B, 32), jnp.int32), jnp.full((B, 32), 2, jnp.int32)], 1)
        kw, rows = dict(segment_ids=seg), slice(0, 32)
    poisoned_from = 48 if kind == "causal" else 32
    v_bad = v.at[:, poisoned_from:].set(jnp.nan)
    k_bad = k.at[:, poisoned_from:].set(jnp.nan)
    got = jax.jit(lambda *a: blockwise_attention(*a, block_sizes=BS, **kw))(q, k_bad, v_bad)[:, rows]
    want = attention_reference(q, k, v, **kw)[:, rows]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_block_sizes_validate_and_shape_errors():
    with pytest.raises(ValueError, match="block_q"):
        BlockSizes(block_q=0)
    q, k, v = make_qkv(fresh_key(), 1, 8, 8, 3, 2, 8)
    with pytest.raises(ValueError, match="H=3 must be a multiple of kv heads K=2"):
        attention(q, k, v)
    q, k, v = make_qkv(fresh_key(), 1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, v, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="backend='nope'"):
        attention(q, k, v, backend="nope")


def test_dispatcher_rules():
    q, k, v = make_qkv(fresh_key(), 1, 8, 8, 2, 1, 8)
    bias = jnp.ones((1, 2, 8, 8))
    assert select_backend(q, k, platform="cpu") == "xla"
    long_q = jax.ShapeDtypeStruct((1, 4096, 2, 8), jnp.float32)
    long_k = jax.ShapeDtypeStruct((1, 4096, 1, 8), jnp.float32)
    assert select_backend(long_q, long_k, platform="cpu") == "blockwise"
    assert select_backend(long_q, long_k, bias=bias, platform="tpu") == "blockwise"
    assert select_backend(q, k, platform="tpu") == "pallas_tpu"
    qb, kb = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    assert select_backend(qb, kb, platform="gpu", causal=True) == "cudnn"
    assert select_backend(qb, kb, platform="gpu", causal=True, alibi_slopes=jnp.ones(2)) == "pallas_gpu"
    assert select_backend(q, k, platform="gpu") == "pallas_gpu"  # f32: cuDNN flash needs bf16/f16
    for backend in ("pallas_gpu", "pallas_tpu", "cudnn"):
        with pytest.raises(ValueError, match="bias"):
            attention(q, k, v, bias=bias, backend=backend, interpret=True)
    with pytest.raises(ValueError, match="ALiBi"):
        attention(qb, kb, kb, alibi_slopes=jnp.ones(2), backend="cudnn")
    # auto with bias on CPU runs and equals the reference
    np.testing.assert_allclose(attention(q, k, v, bias=bias, causal=True),
                               attention_reference(q, k, v, bias=bias, causal=True), atol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_argument_mapping_matches_reference(window):
    """The cuDNN call's argument mapping (causal, window -> local_window_size, scale), run with XLA's implementation
    of the same jax.nn.dot_product_attention API, equals the reference (no GPU needed)."""
    from jaxtx.kernels.dispatch import cudnn_attention

    q, k, v = make_qkv(fresh_key(), 2, 24, 24, 4, 2, 16)
    got = cudnn_attention(q, k, v, causal=True, window=window, softmax_scale=0.3, implementation="xla")
    want = attention_reference(q, k, v, causal=True, window=window, softmax_scale=0.3)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_default_block_sizes_multi_block():
    """The production defaults (512 x 512 tiles) with T > one block and not a multiple of it, through `attention`."""
    B, T, S, H, K, Hd = 1, 600, 600, 2, 1, 16
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    kw = mask_kwargs("segments_causal", key, B, T, S, H)
    check_against_reference(lambda q_, k_, v_: attention(q_, k_, v_, backend="blockwise", **kw), q, k, v, kw)


def test_numpy_int_window_accepted():
    q, k, v = make_qkv(fresh_key(), 1, 20, 20, 2, 1, 8)
    got = blockwise_attention(q, k, v, window=np.int64(5), causal=True, block_sizes=BS)
    np.testing.assert_allclose(got, attention_reference(q, k, v, window=5, causal=True), atol=2e-5)
