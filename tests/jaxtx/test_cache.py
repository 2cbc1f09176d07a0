"""KVCache on its own and against the model: row selection in both layouts, the layout check, spare ring-buffer slots
and taking tokens back (truncate) — the cache must always equal a full forward pass over the tokens it kept."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtx import model as model_lib
from jaxtx.cache import PER_LAYER, KVCache
from jaxtx.config import load_model_config

SMALL = dict(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, max_seq_len=64,
             dtype="float32", init_std=0.3)


def small(**kw):
    cfg = load_model_config("tiny", {**SMALL, **kw})
    m = model_lib.build(cfg)
    return cfg, m, model_lib.init_params(m, jax.random.key(0))


def filled(cfg, B=3, S=5, quantize=False):
    """A cache whose every entry is distinct, so a wrong row shows."""
    c = KVCache.init(cfg, B, S, quantize=quantize)
    keys = iter(jax.random.split(jax.random.key(1), 64))

    def rand(a):
        return jax.random.randint(next(keys), a.shape, -100, 100).astype(a.dtype)
    return jax.tree.map(rand, c)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("quantize", [False, True])
def test_take_selects_reorders_and_repeats_rows(scan, quantize):
    cfg, _, _ = small(scan_layers=scan)
    c = filled(cfg, quantize=quantize)
    assert c.stacked == scan
    rows = np.array([2, 0, 0, 1, 2])
    t = c.take(rows)
    np.testing.assert_array_equal(t.pos, np.asarray(c.pos)[rows])
    np.testing.assert_array_equal(t.lengths, np.asarray(c.lengths)[rows])
    for name in PER_LAYER:
        a, b = getattr(c, name), getattr(t, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if scan:  # [L, B, ...]: batch is axis 1
            np.testing.assert_array_equal(b, np.asarray(a)[:, rows])
        else:
            assert isinstance(b, tuple) and len(b) == cfg.n_layers
            for x, y in zip(a, b):
                np.testing.assert_array_equal(y, np.asarray(x)[rows])


@pytest.mark.parametrize("scan", [True, False])
def test_cache_of_the_other_layout_is_refused(scan):
    cfg, m, p = small(scan_layers=scan)
    other = KVCache.init(cfg.replace(scan_layers=not scan), 1, 8)
    with pytest.raises(ValueError, match="^KV cache layout does not match the model"):
        m.apply({"params": p}, jnp.zeros((1, 2), jnp.int32), cache=other)


def test_spare_slots_and_their_errors():
    cfg, _, _ = small(window=4)
    assert KVCache.init(cfg, 1, 100).slots == 4
    assert KVCache.init(cfg, 1, 100, spare=3).slots == 7
    assert KVCache.init(cfg, 1, 6, spare=3).slots == 6  # never more than max_len
    assert KVCache.init(small()[0], 1, 10, spare=3).slots == 10  # no window: every position has a slot already
    with pytest.raises(ValueError, match="spare=-1 must be >= 0"):
        KVCache.init(cfg, 1, 10, spare=-1)


def test_truncate_empties_slots_at_or_past_the_new_length():
    cfg, _, _ = small()
    c = KVCache.init(cfg, 2, 6)
    c = c.replace(pos=jnp.array([[0, 1, 2, 3, 4, -1], [0, 1, 2, -1, -1, -1]]), lengths=jnp.array([5, 3]))
    t = c.truncate(jnp.array([2, 7]))  # row 1: a length never grows
    np.testing.assert_array_equal(t.pos, [[0, 1, -1, -1, -1, -1], [0, 1, 2, -1, -1, -1]])
    np.testing.assert_array_equal(t.lengths, [2, 3])


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("window", [None, 4])
def test_write_ahead_then_truncate_equals_full_forward(scan, window):
    """The speculative pattern at the model level: each round feeds a chunk of k + 1 tokens of which only the first
    `keep` are right (the rest are junk, as rejected drafts are), then truncates to them. With k spare ring-buffer
    slots the logits of every kept token equal a full forward pass over the true sequence, well past the window."""
    cfg, m, p = small(window=window, scan_layers=scan)
    k, n = 3, 30
    ids = np.asarray(jax.random.randint(jax.random.key(2), (1, n + k + 1), 0, cfg.vocab_size))
    full = np.asarray(m.apply({"params": p}, jnp.asarray(ids[:, :n])))
    step = jax.jit(lambda ids, pos, c: m.apply({"params": p}, ids, positions=pos, cache=c))
    cache = KVCache.init(cfg, 1, n + k + 1, spare=k)
    junk = (ids + 1) % cfg.vocab_size
    t, rng = 0, np.random.default_rng(0)
    while t < n:
        keep = min(int(rng.integers(1, k + 2)), n - t)
        chunk = np.concatenate([ids[:, t:t + keep], junk[:, t + keep:t + k + 1]], axis=1)
        logits, cache = step(jnp.asarray(chunk), jnp.arange(t, t + k + 1)[None], cache)
        np.testing.assert_allclose(np.asarray(logits)[0, :keep], full[0, t:t + keep], atol=1e-4)
        cache = cache.truncate(jnp.array([t + keep]))
        t += keep
        pos = np.asarray(cache.pos)[0]
        assert int(cache.lengths[0]) == t and pos.max() == t - 1
        assert set(range(max(0, t - (window or t)), t)) <= set(pos.tolist())  # the window is all there


def test_the_cache_owns_dtype_ring_and_fullness():
    cfg, _, _ = small(dtype="bfloat16")
    c = KVCache.init(cfg, 2, 6)
    assert c.k.dtype == jnp.bfloat16 and c.dtype == "bfloat16" and not c.ring  # the model's dtype by default
    assert KVCache.init(cfg, 2, 6, dtype=jnp.float32).k.dtype == jnp.float32
    np.testing.assert_array_equal(c.is_full(jnp.array([5, 6])), [False, True])
    ring = KVCache.init(small(window=4)[0], 2, 100)
    assert ring.ring and not ring.is_full(jnp.array([10 ** 6, 0])).any()  # a ring buffer never fills
    with pytest.raises(ValueError, match="dtype=int8 must be a float dtype"):
        KVCache.init(cfg, 1, 4, dtype=jnp.int8)
