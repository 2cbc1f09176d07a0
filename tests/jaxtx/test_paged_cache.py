"""PagedKVCache against the static cache: a flat ragged batch (several sequences, prefill chunks, decode tokens,
random page assignment, padding tokens) gives, token for token, the logits of each sequence run alone through the
static KVCache, in both layer layouts, for GQA (Llama), a sliding window (Mistral) and GPT-2 (learned positions,
MHA, biases); int8 pages match the int8 static cache."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtx import model as model_lib
from jaxtx.cache import KVCache
from jaxtx.config import load_model_config
from jaxtx.paged_cache import PagedKVCache

SMALL = ["vocab_size=97", "d_model=32", "n_heads=4", "n_kv_heads=2", "d_ff=64", "n_layers=2", "init_std=0.3",
         "max_seq_len=64", "dtype=float32"]
FAMILIES = {
    "llama": [],
    "mistral": ["window=4"],
    "gpt2": ["position=learned", "norm=layernorm", "norm_bias=true", "activation=gelu_tanh", "gated=false",
             "qkv_bias=true", "out_bias=true", "mlp_bias=true", "n_kv_heads=4"],
}
PS, PAGES, MAX_SEQS, N = 4, 24, 4, 16  # page size, pool pages, rows per step, flat tokens per step (bucket)


@functools.lru_cache(maxsize=None)
def small(family, scan):
    cfg = load_model_config("tiny", SMALL + FAMILIES[family] + [f"scan_layers={str(scan).lower()}"])
    m = model_lib.build(cfg)
    return cfg, m, model_lib.init_params(m, jax.random.key(0))


def static_logits(cfg, m, p, seq, quantize=False):
    """Logits [T, V] of one sequence alone through the static cache (one prefill call)."""
    cache = KVCache.init(cfg, 1, len(seq), quantize=quantize)
    logits, _ = m.apply({"params": p}, jnp.asarray(seq)[None], cache=cache)
    return np.asarray(logits[0])


def schedule(lens, rng):
    """Steps of (sequence, start, count) runs: random chunk sizes (1 = a decode token), sequences in random order,
    some absent from a step, at most N tokens and MAX_SEQS runs per step."""
    done = [0] * len(lens)
    steps = []
    while any(d < n for d, n in zip(done, lens)):
        runs, used = [], 0
        for r in rng.permutation(len(lens)):
            if done[r] >= lens[r] or len(runs) == MAX_SEQS or rng.random() < 0.2:
                continue
            c = min(int(rng.integers(1, 7)), lens[r] - done[r], N - used)
            if c <= 0:
                continue
            runs.append((int(r), done[r], c))
            done[r] += c
            used += c
        steps.append(runs)
    return steps


def run_paged(cfg, m, p, seqs, rng, quantize=False, fill=None):
    """Every token of seqs through the paged cache -> per sequence, logits [T, V] in position order. fill: a value
    every float page entry starts with (garbage a previous request left behind)."""
    npp = max(-(-len(s) // PS) for s in seqs)
    pages = rng.permutation(PAGES)[: len(seqs) * npp].reshape(len(seqs), npp)  # disjoint random pages
    cache = PagedKVCache.init(cfg, PAGES, PS, quantize=quantize)
    if fill is not None:
        cache = cache.replace(k=jax.tree.map(lambda a: jnp.full_like(a, fill), cache.k),
                              v=jax.tree.map(lambda a: jnp.full_like(a, fill), cache.v))
    fwd = jax.jit(lambda c, ids, pos: m.apply({"params": p}, ids, positions=pos, cache=c))
    got = [np.zeros((len(s), cfg.vocab_size), np.float32) for s in seqs]
    for runs in schedule([len(s) for s in seqs], rng):
        ids, pos, slots = np.zeros(N, np.int32), np.zeros(N, np.int32), np.full(N, -1, np.int32)
        table = np.zeros((MAX_SEQS, npp), np.int32)
        kv_lens, cu = np.zeros(MAX_SEQS, np.int32), np.zeros(MAX_SEQS + 1, np.int32)
        t = 0
        for i, (r, start, c) in enumerate(runs):
            at = np.arange(start, start + c)
            ids[t:t + c], pos[t:t + c] = seqs[r][at], at
            slots[t:t + c] = pages[r, at // PS] * PS + at % PS
            table[i], kv_lens[i] = pages[r], start + c
            t += c
            cu[i + 1:] = t
        pos[t:] = 7  # padding tokens: any position, slot -1 (never written, never attended to)
        logits, cache = fwd(cache.with_step(slots, table, kv_lens, cu, len(runs)), ids[None], pos[None])
        assert cache.step is None
        logits = np.asarray(logits[0])
        assert np.isfinite(logits).all()
        t = 0
        for r, start, c in runs:
            got[r][start:start + c] = logits[t:t + c]
            t += c
    return got, cache


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_ragged_paged_forward_equals_each_sequence_alone(family, scan):
    cfg, m, p = small(family, scan)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (13, 6, 17, 1)]
    got, cache = run_paged(cfg, m, p, seqs, rng)
    assert cache.stacked == scan
    for s, g in zip(seqs, got):
        np.testing.assert_allclose(g, static_logits(cfg, m, p, s), atol=1e-5, rtol=1e-5)


def test_garbage_in_the_pool_is_never_read_and_logits_at_selects_tokens():
    """Pages start full of NaN: only what a sequence wrote is ever read. logits_at [1, M] gives exactly those rows."""
    cfg, m, p = small("llama", False)
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (10, 7)]
    got, _ = run_paged(cfg, m, p, seqs, rng, fill=np.nan)
    for s, g in zip(seqs, got):
        np.testing.assert_allclose(g, static_logits(cfg, m, p, s), atol=1e-5, rtol=1e-5)
    cache = PagedKVCache.init(cfg, PAGES, PS).with_step(np.arange(5), np.array([[0, 1]]), np.array([5]),
                                                         np.array([0, 5]), 1)
    ids, pos = jnp.asarray(seqs[0][:5])[None], jnp.arange(5)[None]
    full, _ = m.apply({"params": p}, ids, positions=pos, cache=cache)
    at, _ = m.apply({"params": p}, ids, positions=pos, cache=cache, logits_at=jnp.array([[4, 1]]))
    assert at.shape == (1, 2, cfg.vocab_size)
    np.testing.assert_allclose(at[0], np.asarray(full[0])[[4, 1]], atol=1e-6)


def test_int8_pages_equal_the_int8_static_cache():
    cfg, m, p = small("llama", False)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (9, 14)]
    got, cache = run_paged(cfg, m, p, seqs, rng, quantize=True)
    assert cache.k[0].dtype == jnp.int8 and cache.quantized
    for s, g in zip(seqs, got):  # same per-token quantization on both sides
        np.testing.assert_allclose(g, static_logits(cfg, m, p, s, quantize=True), atol=1e-4, rtol=1e-4)


def test_pool_layout_dtype_and_bytes():
    cfg, _, _ = small("llama", True)
    c = PagedKVCache.init(cfg, 10, 8, dtype=jnp.bfloat16)
    assert c.k.shape == (cfg.n_layers, cfg.kv_heads, 10, 8, cfg.hd) and c.k.dtype == jnp.bfloat16
    assert (c.num_pages, c.page_size, c.stacked) == (10, 8, True)
    assert c.bytes() == 2 * cfg.n_layers * cfg.kv_heads * 10 * 8 * cfg.hd * 2
    u = PagedKVCache.init(small("llama", False)[0], 10, 8)
    assert isinstance(u.k, tuple) and u.k[0].shape == (cfg.kv_heads, 10, 8, cfg.hd) and u.k[0].dtype == jnp.float32


def test_clear_errors():
    cfg, m, p = small("llama", False)
    cache = PagedKVCache.init(cfg, 4, 4)
    ids = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="no step metadata; call cache.with_step"):
        m.apply({"params": p}, ids, positions=jnp.zeros((1, 2), jnp.int32), cache=cache)
    step = cache.with_step(np.array([0, 1]), np.zeros((1, 1)), np.array([2]), np.array([0, 2]), 1)
    with pytest.raises(ValueError, match="pass positions="):
        m.apply({"params": p}, ids, cache=step)
    with pytest.raises(ValueError, match=r"one flat ragged row \[1, N\] with N = len\(slot_mapping\) = 2"):
        m.apply({"params": p}, jnp.zeros((1, 3), jnp.int32), positions=jnp.zeros((1, 3), jnp.int32), cache=step)
    with pytest.raises(ValueError, match=r"expected slot_mapping \[N\], page_table \[R, pages_per_seq\]"):
        cache.with_step(np.array([0, 1]), np.zeros((2, 1)), np.array([2]), np.array([0, 2]), 1)
    with pytest.raises(ValueError, match="page_size=0 must be an int >= 1"):
        PagedKVCache.init(cfg, 4, 0)
    with pytest.raises(ValueError, match="position='alibi' needs a per-key bias"):
        PagedKVCache.init(cfg.replace(position="alibi"), 4, 4)
    with pytest.raises(ValueError, match="cache layout does not match the model"):
        m.apply({"params": p}, ids, positions=jnp.zeros((1, 2), jnp.int32),
                cache=PagedKVCache.init(cfg.replace(scan_layers=True), 4, 4).with_step(
                    np.array([0, 1]), np.zeros((1, 1)), np.array([2]), np.array([0, 2]), 1))
