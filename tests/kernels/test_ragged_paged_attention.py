"""Ragged paged attention (decode tokens and prefill chunks of many sequences on one flat token axis).

Every backend is checked against a float64 numpy loop written from the contract alone (one query, one head, one
visible position at a time), with the page pool's unused pages and the slots past each sequence's length filled with
NaN: a kernel that reads (rather than masks) a stale slot fails. The Pallas bodies run on CPU in interpret mode (GPU
style) and under the TPU interpreter (TPU style, ~100x slower: small shapes only).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxtx.kernels import ragged_paged_attention


def make_ragged(seed, q_lens, kv_lens, *, N=None, R=None, H=4, K=2, Hd=16, ps=8, npp=None, int8=False,
                per_page=False, dtype=jnp.float32, garbage_rows=False):
    """Pages of each sequence are distinct physical pages in a shuffled order; everything no sequence owns is NaN."""
    rng = np.random.default_rng(seed)
    S = len(q_lens)
    R = S if R is None else R
    N = sum(q_lens) if N is None else N
    npp = max(-(-max(kv_lens) // ps), 1) if npp is None else npp
    P = R * npp + 3
    kf = rng.standard_normal((K, P, ps, Hd)).astype(np.float32)
    vf = rng.standard_normal((K, P, ps, Hd)).astype(np.float32)
    table = rng.permutation(P)[:R * npp].reshape(R, npp).astype(np.int32)
    owned = np.zeros((P, ps), bool)
    for r, L in enumerate(kv_lens):
        for p in range(L):
            owned[table[r, p // ps], p % ps] = True
    kf[:, ~owned], vf[:, ~owned] = np.nan, np.nan
    cu = np.zeros(R + 1, np.int32)
    cu[1:S + 1] = np.cumsum(q_lens)
    cu[S + 1:] = 999 if garbage_rows else cu[S]  # rows >= num_seqs may hold anything
    kl = np.zeros(R, np.int32)
    kl[:S] = kv_lens
    if garbage_rows:  # unused rows and the table entries past each sequence's pages hold junk (-1, huge)
        kl[S:] = 7
        for r in range(R):
            used = -(-kl[r] // ps) if r < S else 0
            table[r, used:] = np.where(np.arange(npp - used) % 2, -1, 10 ** 6)
    d = dict(q=rng.standard_normal((N, H, Hd)).astype(np.float32), kv_lens=kl, page_table=table, cu_q_lens=cu,
             num_seqs=np.int32(S), k_float=kf, v_float=vf)
    if int8:
        axes = (2, 3) if per_page else (3,)
        k_s = np.nanmax(np.abs(np.nan_to_num(kf)), axis=axes) / 127.0 + 1e-6
        v_s = np.nanmax(np.abs(np.nan_to_num(vf)), axis=axes) / 127.0 + 1e-6
        exp = (lambda s: s[:, :, None, None]) if per_page else (lambda s: s[..., None])
        kq = np.round(np.nan_to_num(kf) / exp(k_s)).astype(np.int8)
        vq = np.round(np.nan_to_num(vf) / exp(v_s)).astype(np.int8)
        if not per_page:  # stale slots' scales are garbage too
            k_s[~np.broadcast_to(owned, k_s.shape)] = np.nan
            v_s[~np.broadcast_to(owned, v_s.shape)] = np.inf
        d.update(k_pages=kq, v_pages=vq, k_scales=k_s.astype(np.float32), v_scales=v_s.astype(np.float32))
    else:
        d.update(k_pages=kf, v_pages=vf)
    d["q"] = jnp.asarray(d["q"], dtype)
    if not int8:
        d["k_pages"], d["v_pages"] = jnp.asarray(kf, dtype), jnp.asarray(vf, dtype)
    return d


def numpy_reference(d, window=None, softmax_scale=None):
    """float64, straight from the contract: query i of sequence r is at kv_lens[r] - q_len + i and sees p <= it."""
    q = np.asarray(d["q"], np.float64)
    N, H, Hd = q.shape
    kp = np.asarray(d["k_pages"], np.float64)
    vp = np.asarray(d["v_pages"], np.float64)
    K, _, ps, _ = kp.shape
    if "k_scales" in d:
        ks, vs = np.asarray(d["k_scales"], np.float64), np.asarray(d["v_scales"], np.float64)
        if ks.ndim == 2:
            ks, vs = ks[:, :, None], vs[:, :, None]
        with np.errstate(invalid="ignore"):  # stale slots: garbage scale x 0 page; never visible
            kp, vp = kp * ks[..., None], vp * vs[..., None]
    scale = Hd ** -0.5 if softmax_scale is None else softmax_scale
    out = np.zeros((N, H, Hd))
    cu, kl, table = d["cu_q_lens"], d["kv_lens"], d["page_table"]
    for r in range(int(d["num_seqs"])):
        q_len = cu[r + 1] - cu[r]
        for i in range(q_len):
            pos = kl[r] - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            ps_ = np.arange(lo, pos + 1)
            pages, offs = table[r, ps_ // ps], ps_ % ps
            for h in range(H):
                k, v = kp[h // (H // K), pages, offs], vp[h // (H // K), pages, offs]  # [n_visible, Hd]
                s = k @ q[cu[r] + i, h] * scale
                p = np.exp(s - s.max())
                out[cu[r] + i, h] = p @ v / p.sum()
    return out


def call(d, **kw):
    extra = {n: d[n] for n in ("k_scales", "v_scales") if n in d}
    return ragged_paged_attention(d["q"], d["k_pages"], d["v_pages"], kv_lens=d["kv_lens"], page_table=d["page_table"],
                                  cu_q_lens=d["cu_q_lens"], num_seqs=d["num_seqs"], **extra, **kw)


# q_lens / kv_lens per sequence: decode tokens (q_len 1), prefill chunks attending to their own earlier pages, a
# sequence with q_len 0 (nothing scheduled this step), and a whole-prompt chunk (q_len == kv_len)
CASES = {
    "mixed_gqa2_ps8": dict(q_lens=[1, 3, 0, 17, 1, 1], kv_lens=[9, 20, 5, 33, 1, 40], N=32, R=8),
    "mixed_window_ps16": dict(q_lens=[1, 12, 1, 0, 25], kv_lens=[50, 40, 17, 3, 60], N=48, R=6, ps=16, window=13),
    "mha_full_prefill": dict(q_lens=[48], kv_lens=[48], H=2, K=2, N=64),
    "gqa4_many_decode": dict(q_lens=[1] * 40, kv_lens=list(range(1, 81, 2)), H=8, K=2, N=48, R=48),
    "mqa_int8_token_scales": dict(q_lens=[2, 1, 9], kv_lens=[30, 7, 9], H=4, K=1, N=16, int8=True, window=8),
    "int8_page_scales": dict(q_lens=[5, 1, 1], kv_lens=[21, 64, 2], int8=True, per_page=True, ps=16),
    "garbage_unused_rows": dict(q_lens=[3, 1], kv_lens=[3, 11], N=8, R=5, garbage_rows=True),
}


def _case(name, seed):
    cfg = dict(CASES[name])
    window = cfg.pop("window", None)
    return make_ragged(seed, **cfg), window


@pytest.mark.parametrize("name", list(CASES))
def test_xla_path_matches_float64_loop(name):
    d, window = _case(name, seed=len(name))
    got = np.asarray(call(d, window=window, backend="xla"))
    want = numpy_reference(d, window)
    assert got.shape == d["q"].shape and got.dtype == np.float32
    assert np.isfinite(got).all(), "stale (NaN) slots leaked into the output"
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    end = int(d["cu_q_lens"][int(d["num_seqs"])])
    assert (got[end:] == 0).all(), "padding tokens must be 0"


def test_xla_path_small_chunks_and_items():
    """The loop structure itself (items of bq rows crossing chunk borders, the window skipping whole chunks) checked
    with tiny tiles, so every border is hit at test sizes."""
    from jaxtx.kernels.paged_attention.ragged_reference import ragged_paged_attention_xla

    d, _ = _case("mixed_window_ps16", seed=3)
    args = [jnp.asarray(d[n]) for n in ("q", "k_pages", "v_pages", "kv_lens", "page_table", "cu_q_lens",
                                        "num_seqs")]
    for window in (None, 5, 17):
        got = ragged_paged_attention_xla(*args, window=window, scale=16 ** -0.5, prefill_rows=4, kv_chunk_tokens=16)
        np.testing.assert_allclose(got, numpy_reference(d, window), atol=2e-5, rtol=2e-5)


def test_softmax_scale_and_bf16():
    d = make_ragged(5, [4, 1], [10, 6], dtype=jnp.bfloat16)
    got = call(d, softmax_scale=0.3, backend="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_reference(d, softmax_scale=0.3), atol=3e-2)


def test_no_recompile_for_new_metadata_values():
    """The engine compiles once per shape bucket: other lengths, tables and sequence counts must not retrace."""
    d = make_ragged(7, [1, 6, 2], [4, 6, 30], N=16, R=4, npp=4)
    call(d, backend="xla").block_until_ready()
    size = ragged_paged_attention._cache_size()
    d2 = make_ragged(8, [2, 1, 1, 9], [2, 9, 12, 16], N=16, R=4, npp=4)
    got = call(d2, backend="xla")
    assert ragged_paged_attention._cache_size() == size
    np.testing.assert_allclose(got, numpy_reference(d2), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(q=np.zeros((4, 16))), "q must be"),
    (dict(kv_lens=np.zeros(3, np.int32)), "kv_lens must be"),
    (dict(cu_q_lens=np.zeros(2, np.int32)), "cu_q_lens must be"),
    (dict(num_seqs=np.zeros(2, np.int32)), "num_seqs must be a scalar"),
    (dict(page_table=np.zeros((2, 2), np.float32)), "page_table must be integer"),
    (dict(q=np.zeros((4, 3, 16), np.float32)), "multiple of kv heads"),
    (dict(k_scales=np.ones((2, 3), np.float32)), "give both"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    d = make_ragged(9, [2, 1], [5, 3])
    d.update(bad)
    with pytest.raises(ValueError, match=match):
        call(d)
    with pytest.raises(ValueError, match="window=0"):
        call(make_ragged(9, [2, 1], [5, 3]), window=0)
    with pytest.raises(ValueError, match="backend='cuda'"):
        call(make_ragged(9, [2, 1], [5, 3]), backend="cuda")


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_gpu_interpret_matches_float64_loop(name):
    d, window = _case(name, seed=len(name) + 100)
    got = np.asarray(call(d, window=window, backend="pallas_gpu", interpret=True))
    assert np.isfinite(got).all(), "stale (NaN) slots leaked into the output"
    np.testing.assert_allclose(got, numpy_reference(d, window), atol=2e-5, rtol=2e-5)


TPU_CASES = ["mixed_window_ps16", "mqa_int8_token_scales", "garbage_unused_rows"]  # the TPU interpreter is slow


@pytest.mark.parametrize("name", TPU_CASES)
def test_pallas_tpu_interpret_matches_float64_loop(name):
    d, window = _case(name, seed=len(name) + 200)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = np.asarray(call(d, window=window, backend="pallas_tpu"))
    assert np.isfinite(got).all(), "stale (NaN) slots leaked into the output"
    np.testing.assert_allclose(got, numpy_reference(d, window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("style", ["gpu", "tpu"])
def test_pallas_small_blocks_many_items(style):
    """Tiny items (4 tokens) and KV steps: prefill chunks span several items, items span several KV steps, and the
    window skips whole steps; a 12-token sequence fills its last item exactly."""
    from jaxtx.kernels.paged_attention.ragged_common import RaggedBlockSizes
    from jaxtx.kernels.paged_attention.ragged_gpu import ragged_paged_attention_gpu
    from jaxtx.kernels.paged_attention.ragged_tpu import ragged_paged_attention_tpu

    d = make_ragged(11, [9, 1, 12, 0, 2], [30, 5, 12, 4, 19], N=28, R=6, ps=8, H=2, K=1)
    args = [jnp.asarray(d[n]) for n in ("q", "k_pages", "v_pages", "kv_lens", "page_table", "cu_q_lens",
                                        "num_seqs")]
    kernel = ragged_paged_attention_gpu if style == "gpu" else ragged_paged_attention_tpu
    fn = jax.jit(lambda *a, window: kernel(*a, k_scales=None, v_scales=None, window=window, scale=0.25,
                                           interpret=True, block_sizes=RaggedBlockSizes(q_tokens=4, kv_tokens=16)),
                 static_argnames="window")
    for window in (None, 6) if style == "gpu" else (6,):
        np.testing.assert_allclose(fn(*args, window=window), numpy_reference(d, window, softmax_scale=0.25),
                                   atol=2e-5, rtol=2e-5)


def test_block_sizes_validate():
    from jaxtx.kernels.paged_attention.ragged_common import RaggedBlockSizes

    with pytest.raises(ValueError, match="q_tokens=12"):
        RaggedBlockSizes(q_tokens=12)


def test_xla_path_memory_at_engine_sizes():
    """N=512 tokens, R=64 sequences, 2048-token page tables: the compiled XLA path's scratch stays a few MB. A per-token
    K/V gather would need 1 GiB, a per-sequence one [R, K, S, Hd] 128 MiB (compile only, nothing runs)."""
    N, R, npp, ps, K, H, Hd = 512, 64, 128, 16, 4, 12, 64
    sds = jax.ShapeDtypeStruct
    pages = sds((K, R * npp, ps, Hd), jnp.float32)
    meta = dict(kv_lens=sds((R,), jnp.int32), page_table=sds((R, npp), jnp.int32), cu_q_lens=sds((R + 1,), jnp.int32),
                num_seqs=sds((), jnp.int32))
    f = jax.jit(lambda q, k, v, **kw: ragged_paged_attention(q, k, v, **kw, backend="xla"))
    mem = f.lower(sds((N, H, Hd), jnp.float32), pages, pages, **meta).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 16 << 20, mem.temp_size_in_bytes
