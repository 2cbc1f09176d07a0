"""Paged attention: the reference against contiguous-cache attention, and both Pallas bodies (GPU-style interpret,
TPU interpret) against the reference, with GQA, several query tokens, sliding windows and int8 pages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_testutil import fresh_key

from jaxtx.kernels import attention_reference, paged_attention, paged_attention_reference


def make_paged(key, *, B=3, T=1, H=4, K=2, Hd=16, ps=8, npp=5, P=20, int8=False, per_page=False):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, Hd))
    kf = jax.random.normal(ks[1], (K, P, ps, Hd))
    vf = jax.random.normal(ks[2], (K, P, ps, Hd))
    lengths = jax.random.randint(ks[3], (B,), T, npp * ps + 1).at[0].set(npp * ps)  # one full table
    page_indices = jax.random.permutation(ks[4], P)[:B * npp].reshape(B, npp)  # distinct physical pages, shuffled
    out = dict(q=q, k_pages=kf, v_pages=vf, lengths=lengths, page_indices=page_indices)
    if int8:
        axes = (2, 3) if per_page else (3,)
        k_s = jnp.max(jnp.abs(kf), axis=axes) / 127.0
        v_s = jnp.max(jnp.abs(vf), axis=axes) / 127.0
        exp = (lambda s: s[:, :, None, None]) if per_page else (lambda s: s[..., None])
        out.update(k_pages=jnp.round(kf / exp(k_s)).astype(jnp.int8), v_pages=jnp.round(vf / exp(v_s)).astype(jnp.int8),
                   k_scales=k_s, v_scales=v_s, k_float=kf, v_float=vf)
    return out


def _call(d, **kw):
    args = {n: d[n] for n in ("k_scales", "v_scales") if n in d}
    fn = jax.jit(lambda *a, **s: paged_attention(*a, **s, **kw))  # one compile, not many eager dispatches
    return fn(d["q"], d["k_pages"], d["v_pages"], d["lengths"], d["page_indices"], **args)


@pytest.mark.parametrize("T,window", [(1, None), (3, None), (2, 11)])
def test_reference_matches_contiguous_attention(T, window):
    d = make_paged(fresh_key(), T=T)
    got = _call(d, backend="xla", window=window)
    # Independent path: gather to [B, S, K, Hd] and use reference.attention_reference with positions.
    K, _, ps, Hd = d["k_pages"].shape
    B, npp = d["page_indices"].shape
    gather = lambda pages: jnp.moveaxis(pages[:, d["page_indices"]], 0, 3).reshape(B, npp * ps, K, Hd)  # noqa
    kv_pos = jnp.where(jnp.arange(npp * ps)[None] < d["lengths"][:, None], jnp.arange(npp * ps)[None], -1)
    q_pos = d["lengths"][:, None] - T + jnp.arange(T)[None]
    ref = jax.jit(attention_reference, static_argnames=("causal", "window"))
    want = ref(d["q"], gather(d["k_pages"]), gather(d["v_pages"]), causal=True, window=window,
               q_positions=q_pos, kv_positions=kv_pos)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


CASES = {
    "decode_gqa": dict(T=1),
    "spec3_window": dict(T=3, window=13),
    "mqa_int8_token": dict(T=1, H=4, K=1, int8=True),
    "int8_page_scales": dict(T=2, int8=True, per_page=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pallas_gpu_interpret(case):
    cfg = dict(CASES[case])
    window = cfg.pop("window", None)
    d = make_paged(fresh_key(), **cfg)
    got = _call(d, backend="pallas_gpu", interpret=True, window=window)
    want = _call(d, backend="xla", window=window)
    assert got.shape == d["q"].shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", ["spec3_window", "int8_page_scales"])
def test_pallas_tpu_interpret(case):
    cfg = dict(CASES[case])
    window = cfg.pop("window", None)
    d = make_paged(fresh_key(), **cfg)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = _call(d, backend="pallas_tpu", window=window)
    np.testing.assert_allclose(got, _call(d, backend="xla", window=window), atol=2e-5, rtol=2e-5)


def test_int8_close_to_float_and_single_token_layout():
    d = make_paged(fresh_key(), T=1, int8=True)
    q3 = d["q"][:, 0]  # [B, H, Hd] form
    got = paged_attention(q3, d["k_pages"], d["v_pages"], d["lengths"], d["page_indices"], k_scales=d["k_scales"],
                          v_scales=d["v_scales"], backend="pallas_gpu", interpret=True)
    assert got.shape == q3.shape
    want_float = paged_attention_reference(q3, d["k_float"], d["v_float"], d["lengths"], d["page_indices"])
    np.testing.assert_allclose(got, want_float, atol=3e-2)  # int8 rounding only


def test_empty_sequence_returns_zeros_and_errors_are_clear():
    d = make_paged(fresh_key(), T=1)
    d["lengths"] = d["lengths"].at[1].set(0)
    for backend in ("xla", "pallas_gpu"):
        o = _call(d, backend=backend, interpret=True)
        np.testing.assert_array_equal(np.asarray(o[1]), 0.0)
        assert np.isfinite(np.asarray(o)).all()
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention(jnp.ones((3, 3, 16)), d["k_pages"], d["v_pages"], d["lengths"], d["page_indices"])
    with pytest.raises(ValueError, match="need k_scales"):
        paged_attention(d["q"], d["k_pages"].astype(jnp.int8), d["v_pages"].astype(jnp.int8), d["lengths"],
                        d["page_indices"])
