"""Model behaviour against closed forms and float64 numpy references (HF parity lives in test_hf.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtx import model as model_lib
from jaxtx.cache import KVCache
from jaxtx.config import load_model_config, preset_names
from jaxtx.layers import moe as moe_lib
from jaxtx.layers.positions import alibi_slopes, apply_rope, rope_cos_sin, rope_inv_freq, t5_bucket

SMALL = dict(vocab_size=97, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, n_layers=2, max_seq_len=64, dtype="float32")


def small(preset="tiny", **kw):
    ov = dict(SMALL)
    if preset in ("t5-small", "t5-v1_1-base"):
        ov["head_dim"] = 16
    ov.update(kw)
    return load_model_config(preset, ov)


def setup(cfg, seed=0, B=2, T=12):
    m = model_lib.build(cfg)
    p = model_lib.init_params(m, jax.random.key(seed))
    ids = jax.random.randint(jax.random.key(seed + 1), (B, T), 0, cfg.vocab_size)
    return m, p, ids


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", preset_names())
def test_eval_shape_every_preset(name):
    """Every preset, 70B and Mixtral included, builds and runs abstractly: shapes without memory."""
    cfg = load_model_config(name)
    m = model_lib.build(cfg)
    ab = model_lib.abstract_params(m)
    B, T = 2, 16
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(ab))
    if cfg.kind == "encoder_decoder":
        out = jax.eval_shape(lambda p, i: m.apply({"params": p}, i, decoder_input_ids=i), params, ids)
        assert out.shape == (B, T, cfg.vocab_size)
    elif cfg.kind == "encoder":
        out = jax.eval_shape(lambda p, i: m.apply({"params": p}, i), params, ids)
        assert out.shape == (B, T, cfg.d_model)
    else:
        out = jax.eval_shape(lambda p, i: m.apply({"params": p}, i), params, ids)
        assert out.shape == (B, T, cfg.vocab_size) and out.dtype == jnp.float32


def test_every_param_has_logical_axes():
    for name in ["tiny", "mixtral-8x7b", "bert-base", "t5-small", "gpt2"]:
        ab = model_lib.abstract_params(model_lib.build(load_model_config(name)))
        leaves = jax.tree.leaves(ab, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned), f"{name}: a parameter without logical axes: {leaf}"
            assert len(leaf.names) == leaf.value.ndim


# ------------------------------------------------------------------------------------------------ masks by gradients
def embedding_grads(cfg, ids, t, **kw):
    """|d logits[0, t] / d embedded[0, j]| summed over D, for every j."""
    m = model_lib.build(cfg)
    v = m.init(jax.random.key(0), ids)
    p = v["params"]
    pert = jax.tree.map(jnp.zeros_like, v["perturbations"])

    def f(pert):
        out = m.apply({"params": p, "perturbations": pert}, ids, **kw)
        return jnp.sum(out[0, t] * jnp.arange(out.shape[-1]))  # a generic functional of the output

    g = jax.grad(f)(pert)["embedded"]
    return np.asarray(jnp.sum(jnp.abs(g[0]), axis=-1))


@pytest.mark.parametrize("position", ["rope", "learned", "alibi", "sinusoidal"])
def test_causality_by_gradients(position):
    cfg = small(position=position)
    ids = jax.random.randint(jax.random.key(3), (1, 10), 0, cfg.vocab_size)
    for t in (0, 4, 9):
        g = embedding_grads(cfg, ids, t)
        assert np.all(g[t + 1:] == 0.0), f"output {t} depends on a later position: {g}"
        assert np.all(g[: t + 1] > 0.0)


def test_sliding_window_by_gradients():
    """One layer: query t sees exactly keys t-W < j <= t."""
    W = 3
    cfg = small(n_layers=1, window=W)
    ids = jax.random.randint(jax.random.key(4), (1, 10), 0, cfg.vocab_size)
    for t in (1, 5, 9):
        g = embedding_grads(cfg, ids, t)
        visible = [(t - W < j <= t) for j in range(10)]
        assert np.all((g > 0) == np.array(visible)), (t, g)


def test_packed_segments_never_attend_across_documents():
    cfg = small()
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3]])
    ids = jax.random.randint(jax.random.key(5), (1, 10), 0, cfg.vocab_size)
    g = embedding_grads(cfg, ids, 5, segment_ids=seg)
    assert np.all(g[:3] == 0) and np.all(g[6:] == 0) and np.all(g[3:6] > 0)
    # positions restart per document: document 2 alone gives the same logits
    m, p, _ = setup(cfg)
    packed = m.apply({"params": p}, ids, segment_ids=seg)
    alone = m.apply({"params": p}, ids[:, 3:7])
    np.testing.assert_allclose(packed[:, 3:7], alone, atol=1e-5)


def test_encoder_padding_mask_by_gradients():
    cfg = small("bert-base", dropout=0.0)
    ids = jax.random.randint(jax.random.key(6), (1, 8), 0, cfg.vocab_size)
    mask = jnp.array([[1, 1, 1, 1, 1, 0, 0, 0]])
    g = embedding_grads(cfg, ids, 2, attention_mask=mask)
    assert np.all(g[5:] == 0) and np.all(g[:5] > 0)  # bidirectional over the real tokens, blind to padding


# ------------------------------------------------------------------------------------------------ positions
def test_rope_depends_only_on_relative_position():
    cfg = small(n_heads=2, n_kv_heads=1, d_model=32)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n):
        cm, sm = rope_cos_sin(cfg, jnp.array([[m]]))
        cn, sn = rope_cos_sin(cfg, jnp.array([[n]]))
        return float(jnp.sum(apply_rope(q, cm, sm) * apply_rope(k, cn, sn)))

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    assert score(5, 5) == pytest.approx(float(jnp.sum(q * k)), abs=1e-5)  # rotation is orthogonal


def test_rope_scaling_closed_forms():
    base = small(d_model=512, n_heads=4, n_kv_heads=4)  # Hd = 128
    inv0, _ = rope_inv_freq(base)
    lin, _ = rope_inv_freq(base.replace(rope_scaling="linear", rope_factor=4.0))
    np.testing.assert_allclose(lin, inv0 / 4)
    ntk, _ = rope_inv_freq(base.replace(rope_scaling="ntk", rope_factor=4.0))
    assert ntk[0] == pytest.approx(inv0[0]) and ntk[-1] == pytest.approx(inv0[-1] / 4)  # only low freqs stretch
    yarn, factor = rope_inv_freq(base.replace(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=4096))
    assert yarn[0] == pytest.approx(inv0[0]) and yarn[-1] == pytest.approx(inv0[-1] / 4)
    assert factor == pytest.approx(0.1 * np.log(4.0) + 1)
    l3, _ = rope_inv_freq(base.replace(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8192))
    wavelen = 2 * np.pi / inv0
    hi, lo = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
    np.testing.assert_allclose(l3[hi], inv0[hi])
    np.testing.assert_allclose(l3[lo], inv0[lo] / 8)
    mid = ~hi & ~lo
    assert np.all((l3[mid] < inv0[mid]) & (l3[mid] > inv0[mid] / 8))


def test_alibi_slopes_match_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    s12 = alibi_slopes(12)
    np.testing.assert_allclose(s12[:8], [2.0 ** -(i + 1) for i in range(8)])
    np.testing.assert_allclose(s12[8:], [2.0 ** -(0.5 + i) for i in range(4)])


def test_alibi_bias_values_in_attention():
    """With q = k = 0 the scores are pure ALiBi bias: the weights of query t are softmax(-slope * (t - j))."""
    from jaxtx.kernels import attention_reference
    H, T = 2, 5
    slopes = jnp.asarray(alibi_slopes(H))
    zeros = jnp.zeros((1, T, H, T))
    v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, H, T))  # value of key j is the one-hot e_j
    o = attention_reference(zeros, zeros, v, causal=True, alibi_slopes=slopes)
    t = 4
    w = np.exp(-np.asarray(slopes)[:, None] * (t - np.arange(T))[None, :])
    np.testing.assert_allclose(np.asarray(o[0, t]), w / w.sum(-1, keepdims=True), atol=1e-6)


def test_t5_buckets_hand_computed():
    rel = jnp.array([0, 1, -1, -8, -200, 200, 7, -7])
    b = t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert list(np.asarray(b)) == [0, 17, 1, 8, 15, 31, 23, 7]
    b = t5_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert list(np.asarray(b)) == [0, 0, 1, 8, 31, 0, 0, 7]


# ------------------------------------------------------------------------------------------------ scan / remat
@pytest.mark.parametrize("preset", ["tiny", "bert-base", "t5-small"])
def test_scan_equals_unrolled(preset):
    cfg = small(preset, dropout=0.0)
    m, p, ids = setup(cfg)
    cfg_u = cfg.replace(scan_layers=False)
    mu = model_lib.build(cfg_u)
    pu = model_lib.unstack_layers(p)
    assert jax.tree.structure(pu) == jax.tree.structure(model_lib.init_params(mu, jax.random.key(0)))
    args = (ids, ids) if cfg.kind == "encoder_decoder" else (ids,)
    np.testing.assert_allclose(m.apply({"params": p}, *args), mu.apply({"params": pu}, *args), atol=1e-5)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), model_lib.stack_layers(pu), p))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_same_outputs_and_grads(policy):
    cfg = small()
    m, p, ids = setup(cfg)
    mr = model_lib.build(cfg.replace(remat=policy))

    def loss(model, p):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, ids))[..., 0])

    l0, g0 = jax.value_and_grad(lambda p: loss(m, p))(p)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(mr, p)))(p)
    assert l0 == pytest.approx(float(l1), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_dropout_only_when_not_deterministic():
    cfg = small(dropout=0.5)
    m, p, ids = setup(cfg)
    a = m.apply({"params": p}, ids)
    b = m.apply({"params": p}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, m.apply({"params": p}, ids))


# ------------------------------------------------------------------------------------------------ MoE
def np_moe(x, router, w, k, act):
    """float64 numpy Mixtral MoE: softmax -> top-k -> renormalize -> sum_k w_k * FFN_e(x)."""
    x = np.asarray(x, np.float64)
    logits = x @ np.asarray(router, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        top = np.argsort(-probs[n])[:k]
        ws = probs[n, top] / probs[n, top].sum()
        for e, we in zip(top, ws):
            h = act(x[n] @ w["wi_gate"][e]) * (x[n] @ w["wi_up"][e])
            out[n] += we * (h @ w["wo"][e])
    return out


def test_moe_dropless_matches_numpy():
    cfg = small("mixtral-8x7b", n_kv_heads=2, num_experts=4, experts_per_token=2, n_layers=1)
    N, D = 24, cfg.d_model
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (N, D))
    router = jax.random.normal(ks[1], (D, 4))
    w = {n: 0.2 * jax.random.normal(kk, s) for n, kk, s in
         [("wi_gate", ks[2], (4, D, 96)), ("wi_up", ks[3], (4, D, 96)), ("wo", ks[4], (4, 96, D))]}
    probs, wk, ek = moe_lib.route(x @ router, 2)
    y, dropped = moe_lib.experts_dropless(x, wk, ek, w, cfg)
    silu = lambda a: a / (1 + np.exp(-a))
    np.testing.assert_allclose(np.asarray(y), np_moe(x, router, jax.tree.map(np.asarray, w), 2, silu),
                               rtol=1e-4, atol=1e-4)
    assert float(dropped) == 0.0
    # capacity large enough to drop nothing: identical to dropless
    y2, dropped2 = moe_lib.experts_capacity(x[None], wk[None], ek[None], w, cfg.replace(capacity_factor=4.0))
    np.testing.assert_allclose(y2[0], y, rtol=1e-4, atol=1e-4)
    assert float(dropped2) == 0.0


def test_moe_capacity_drops_are_counted():
    """Route every token to expert 0 first: with C slots, exactly N - C first choices survive-less."""
    cfg = small("mixtral-8x7b", num_experts=4, experts_per_token=1, capacity_factor=1.0, n_layers=1)
    T, D = 16, cfg.d_model
    x = jax.random.normal(jax.random.key(0), (1, T, D))
    e = jnp.zeros((1, T, 1), jnp.int32)
    wk = jnp.ones((1, T, 1))
    w = {n: jax.random.normal(jax.random.key(i), s) for i, (n, s) in
         enumerate([("wi_gate", (4, D, 96)), ("wi_up", (4, D, 96)), ("wo", (4, 96, D))])}
    y, dropped = moe_lib.experts_capacity(x, wk, e, w, cfg)
    C = 4  # ceil(1 * 16 / 4 * 1.0)
    assert float(dropped) == pytest.approx((T - C) / T)
    assert np.all(np.abs(np.asarray(y[0, :C])).sum(-1) > 0)  # the first C tokens were served, in order
    assert np.all(np.asarray(y[0, C:]) == 0)


def test_moe_aux_losses_are_sown_and_balanced_routing_gives_one():
    cfg = small("mixtral-8x7b", n_kv_heads=2, num_experts=4)
    m, p, ids = setup(cfg)
    _, st = m.apply({"params": p}, ids, mutable=["intermediates"])
    inter = st["intermediates"]
    assert jax.tree.leaves(inter["layers"]["moe"]["router_aux_loss"])[0].shape == (cfg.n_layers,)
    aux = model_lib.moe_aux_loss(inter, cfg)
    assert float(aux) > 0
    probs = jnp.full((8, 4), 0.25)
    e = jnp.array([[0], [1], [2], [3], [0], [1], [2], [3]])
    lb, _ = moe_lib.router_losses(jnp.zeros((8, 4)), probs, e, 4)
    assert float(lb) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("preset,kw", [("tiny", {}), ("gpt2", {}), ("tiny", {"window": 4}),
                                        ("mixtral-8x7b", {"num_experts": 4, "n_kv_heads": 2}),
                                        ("tiny", {"position": "alibi"})])
def test_prefill_then_decode_equals_full_forward(preset, kw):
    cfg = small(preset, **kw)
    m, p, ids = setup(cfg, T=11)
    full = m.apply({"params": p}, ids)
    step = jax.jit(lambda ids, cache: m.apply({"params": p}, ids, cache=cache))
    cache = KVCache.init(cfg, 2, 16)
    lp, cache = step(ids[:, :6], cache)
    np.testing.assert_allclose(lp, full[:, :6], atol=1e-4)
    for t in range(6, 11):
        lt, cache = step(ids[:, t:t + 1], cache)
        np.testing.assert_allclose(lt[:, 0], full[:, t], atol=1e-4)
    assert list(np.asarray(cache.lengths)) == [11, 11]
    if cfg.window:
        assert cache.slots == cfg.window  # ring buffer: memory does not grow with context


def test_int8_cache_is_close_and_half_the_bytes():
    cfg = small()
    m, p, ids = setup(cfg, T=10)
    full = m.apply({"params": p}, ids)
    c8 = KVCache.init(cfg, 2, 16, dtype=jnp.bfloat16, quantize=True)
    cb = KVCache.init(cfg, 2, 16, dtype=jnp.bfloat16)
    assert c8.k.nbytes * 2 == cb.k.nbytes
    lp, c8 = m.apply({"params": p}, ids, cache=c8)
    assert float(jnp.max(jnp.abs(lp - full))) < 0.05 * float(jnp.max(jnp.abs(full)))


def test_t5_decode_with_cache_equals_full():
    cfg = small("t5-small", dropout=0.0)
    m, p, ids = setup(cfg, T=9)
    dec = ids[:, :7]
    full = m.apply({"params": p}, ids, decoder_input_ids=dec)
    enc = m.apply({"params": p}, ids, method="encode")
    cache = KVCache.init(cfg, 2, 8)
    step = jax.jit(lambda ids, cache: m.apply({"params": p}, ids, enc, cache=cache, method="decode"))
    l0, cache = step(dec[:, :3], cache)
    np.testing.assert_allclose(l0, full[:, :3], atol=1e-4)
    assert cache.cross_k is not None
    for t in range(3, 7):
        lt, cache = step(dec[:, t:t + 1], cache)
        np.testing.assert_allclose(lt[:, 0], full[:, t], atol=1e-4)


def test_bad_input_ids_clear_error():
    cfg = small()
    m, p, _ = setup(cfg)
    with pytest.raises(ValueError, match=r"input_ids: expected int token ids of shape \[B, T\]"):
        m.apply({"params": p}, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        m.apply({"params": p}, jnp.zeros((1, 4), jnp.float32))


def test_decode_step_updates_the_cache_in_place():
    """The stacked cache rides in the scan carry: compiled temps hold at most about one layer's K/V, never another full
    copy of the cache (which a scan output would allocate every step)."""
    cfg = small(n_layers=4)
    m, p, _ = setup(cfg)
    cache = KVCache.init(cfg, 4, 512)
    step = jax.jit(lambda p, ids, c: m.apply({"params": p}, ids, cache=c), donate_argnums=(2,))
    ma = step.lower(p, jnp.zeros((4, 1), jnp.int32), cache).compile().memory_analysis()
    assert ma.alias_size_in_bytes >= cache.bytes() * 0.99  # the donated cache is the output cache
    assert ma.temp_size_in_bytes < 0.5 * cache.bytes(), (ma.temp_size_in_bytes, cache.bytes())


def test_logits_at_selects_positions():
    """Prefill asks for the last prompt token only: logits_at gives exactly those rows of the full logits."""
    cfg = small()
    m, p, ids = setup(cfg, T=9)
    full = m.apply({"params": p}, ids)
    at = jnp.array([[8], [3]])
    np.testing.assert_allclose(m.apply({"params": p}, ids, logits_at=at), full[jnp.arange(2)[:, None], at], atol=1e-5)
