"""Shared helpers for the kernel tests: fresh random inputs, mask cases, and the compare-to-reference check."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx.kernels.reference import attention_reference

_SEED = itertools.count(1000)

MASK_CASES = ("none", "causal", "causal_window", "window", "segments_causal", "kv_padding", "alibi_causal",
              "segments_unsorted")


def fresh_key():
    """A new key per call: every test case draws its own inputs (never zeros, never shared)."""
    return jax.random.PRNGKey(next(_SEED))


def make_qkv(key, B, T, S, H, K, Hd, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, H, Hd), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, Hd), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, Hd), jnp.float32).astype(dtype)
    return q, k, v


def mask_kwargs(case, key, B, T, S, H):
    k1, k2 = jax.random.split(key)
    if case == "none":
        return {}
    if case == "causal":
        return dict(causal=True)
    if case == "causal_window":
        return dict(causal=True, window=max(3, T // 3))
    if case == "window":
        return dict(window=max(3, S // 4))
    if case == "segments_causal":  # packed documents: sorted ids, T == S required for the default kv ids
        seg = jnp.sort(jax.random.randint(k1, (B, T), 1, 4), axis=1)
        kv = jnp.sort(jax.random.randint(k2, (B, S), 1, 4), axis=1)
        return dict(causal=True, segment_ids=seg, kv_segment_ids=kv)
    if case == "segments_unsorted":  # ids not sorted: block skipping must stay exact
        seg = jax.random.randint(k1, (B, T), 0, 3)
        kv = jax.random.randint(k2, (B, S), 0, 3)
        return dict(segment_ids=seg, kv_segment_ids=kv)
    if case == "kv_padding":  # the model's key-padding form: kv_segment_ids = attention_mask
        lens = jax.random.randint(k1, (B,), 1, S + 1)
        return dict(kv_segment_ids=(jnp.arange(S)[None, :] < lens[:, None]).astype(jnp.int32))
    if case == "alibi_causal":
        return dict(causal=True, alibi_slopes=jax.random.uniform(k1, (H,), minval=0.05, maxval=0.5))
    raise ValueError(case)


def fwd_and_grads(fn, q, k, v, ct):
    """(o, dq, dk, dv) of fn with a random output cotangent ct (so gradients see every output element)."""
    def run(q, k, v, ct):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(ct.astype(o.dtype)))
    return jax.jit(run)(q, k, v, ct)  # one compile instead of hundreds of eager op dispatches


def tolerance(dtype):
    return dict(atol=2e-4, rtol=2e-4) if dtype == jnp.float32 else dict(atol=6e-2, rtol=6e-2)


def check_against_reference(fn, q, k, v, kw, *, check_grads=True, key=None):
    """Compare fn(q, k, v) (and its q/k/v gradients) to the f32 reference on the same (possibly bf16) inputs."""
    key = fresh_key() if key is None else key
    ct = jax.random.normal(key, q.shape, jnp.float32)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_fn = lambda q_, k_, v_: attention_reference(q_, k_, v_, **kw)  # noqa: E731
    tol = tolerance(q.dtype)
    if not check_grads:
        got, want = jax.jit(fn)(q, k, v), jax.jit(ref_fn)(*f32)
        assert got.shape == q.shape and got.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), **tol)
        return
    got = fwd_and_grads(lambda q_, k_, v_: fn(q_, k_, v_), q, k, v, ct)
    want = fwd_and_grads(ref_fn, *f32, ct)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        g = np.asarray(g.astype(jnp.float32))
        w = np.asarray(w)
        assert np.isfinite(g).all(), f"{name} has non-finite values"
        # Scale-aware tolerance: gradients of sums over S grow with the problem; normalize by the largest entry.
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g / scale, w / scale, err_msg=name, **tol)


def check_mask_case(make_fn, case, shape=(2, 37, 45, 4, 2, 16)):
    """One MASK_CASES entry: make_fn(**mask kwargs) -> fn(q, k, v) against the reference, f32, with gradients. The
    default shape has T != S, neither a multiple of a block, and GQA 2."""
    B, T, S, H, K, Hd = shape
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    kw = mask_kwargs(case, jax.random.fold_in(key, 1), B, T, S, H)
    check_against_reference(make_fn(**kw), q, k, v, kw)


def numpy_attention_f64(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                        alibi_slopes=None, softmax_scale=None):
    """Independent float64 numpy attention (loops over heads; no shared code with the kernels or the reference)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, Hd = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = Hd ** -0.5 if softmax_scale is None else softmax_scale
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    vis = np.ones((B, T, S), bool)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= (i - j < window) & ((j - i < window) | causal)
    if segment_ids is not None:
        kvs = np.asarray(segment_ids if kv_segment_ids is None else kv_segment_ids)
        vis &= np.asarray(segment_ids)[:, :, None] == kvs[:, None, :]
    elif kv_segment_ids is not None:
        vis &= (np.asarray(kv_segment_ids) != 0)[:, None, :]
    out = np.zeros((B, T, H, Hd))
    for h in range(H):
        s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // (H // K)]) * scale
        if alibi_slopes is not None:
            s = s - float(alibi_slopes[h]) * np.abs(i - j)
        s = np.where(vis, s, -np.inf)
        m = s.max(-1, keepdims=True)
        p = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
        l = p.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", p / np.where(l == 0, 1, l), v[:, :, h // (H // K)])
    return out
