"""Chunked cross-entropy through the head (jaxtx.train.chunked_ce): the loss, the per-row sums and both gradients
against a float64 numpy reference, the causal and DPO objectives against the logits path (loss, gradients, 20
training losses), and the compiled step's temp memory (the [B, T, V] logits must be gone)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import run_cfg

from jaxtx import model as model_lib
from jaxtx.train.chunked_ce import linear_ce_rows, linear_ce_sum
from jaxtx.train.objectives import make_objective
from jaxtx.train.optim import make_optimizer
from jaxtx.train.step import abstract_batch, abstract_train_state, init_params, make_train_step


def _reference(x, w_dv, t, wt, g_B=None):
    """float64 loss, d/dx, d/dW[D, V] of sum(wt * CE(x @ W, t)); with g_B, per-row sums [B] and the gradients of
    sum_b g_B[b] * sums[b]."""
    x, w_dv, wt = (np.asarray(a, np.float64) for a in (x, w_dv, wt))
    if g_B is not None:
        rows = _reference(x, w_dv, t, wt * np.asarray(g_B, np.float64)[:, None])[1:]
        return (_per_row(x, w_dv, t, wt), *rows)
    logits = x @ w_dv
    m = logits.max(-1, keepdims=True)
    p = np.exp(logits - m)
    lse = m[..., 0] + np.log(p.sum(-1))
    picked = np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0]
    d = p / p.sum(-1, keepdims=True)
    np.put_along_axis(d, np.asarray(t)[..., None], np.take_along_axis(d, np.asarray(t)[..., None], -1) - 1, -1)
    d *= wt[..., None]
    return ((lse - picked) * wt).sum(), d @ w_dv.T, np.einsum("btd,btv->dv", x, d)


def _per_row(x, w_dv, t, wt):
    logits = x @ w_dv
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    return ((lse - np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0]) * wt).sum(-1)


@pytest.mark.parametrize("layout", ["DV", "VD"])
@pytest.mark.parametrize("T,chunk_rows", [(12, 8), (7, 6)])  # several chunks, padded T
def test_linear_ce_rows_matches_float64(layout, T, chunk_rows):
    rng = np.random.default_rng(T)
    B, D, V = 3, 16, 50
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    w_dv = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    t = rng.integers(0, V, (B, T)).astype(np.int32)
    wt = (rng.random((B, T)) > 0.3).astype(np.float32)
    g = np.array([0.7, -1.3, 2.0], np.float32)  # a cotangent per row, as DPO's sigmoid gives
    w = w_dv if layout == "DV" else w_dv.T
    sums, vjp = jax.vjp(lambda x, w: linear_ce_rows(x, w, t, wt, w_layout=layout, chunk_rows=chunk_rows),
                        jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    ref_rows, ref_dx, ref_dw = _reference(x, w_dv, t, wt, g_B=g)
    assert sums.shape == (B,)
    np.testing.assert_allclose(np.asarray(sums), ref_rows, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), ref_dw if layout == "DV" else ref_dw.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["DV", "VD"])
@pytest.mark.parametrize("T,chunk_rows", [(12, 8), (12, 1000), (7, 6)])  # several chunks, one chunk, padded T
def test_linear_ce_sum_matches_float64(layout, T, chunk_rows):
    rng = np.random.default_rng(T + chunk_rows)
    B, D, V = 3, 16, 50
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    w_dv = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    t = rng.integers(0, V, (B, T)).astype(np.int32)
    wt = (rng.random((B, T)) > 0.3).astype(np.float32) * rng.uniform(0.5, 2.0, (B, T)).astype(np.float32)
    w = w_dv if layout == "DV" else w_dv.T

    def f(x, w):
        return linear_ce_sum(x, w, t, wt, w_layout=layout, chunk_rows=chunk_rows)
    loss, (dx, dw) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    ref_loss, ref_dx, ref_dw = _reference(x, w_dv, t, wt)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x), jnp.asarray(w))), ref_loss, rtol=2e-6)  # primal path
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), ref_dw if layout == "DV" else ref_dw.T, rtol=1e-5, atol=1e-6)
    # the incoming cotangent scales both gradients (the custom_vjp stores them unscaled)
    g2 = jax.grad(lambda x: 2.5 * f(x, jnp.asarray(w)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g2), 2.5 * ref_dx, rtol=1e-5, atol=1e-6)


def test_linear_ce_sum_bad_shapes():
    x, w = jnp.zeros((2, 4, 8)), jnp.zeros((8, 10))
    t, wt = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"w \[V, D\]"):
        linear_ce_sum(x, w, t, wt, w_layout="VD")
    with pytest.raises(ValueError, match="w_layout='XY'"):
        linear_ce_sum(x, w, t, wt, w_layout="XY")
    with pytest.raises(ValueError, match="targets"):
        linear_ce_sum(x, w, t[:, :3], wt)


@pytest.mark.parametrize("tied", [False, True])
def test_causal_objective_chunked_equals_logits_path(tied):
    extra = ["model.tie_embeddings=true", "model.rescale_tied_logits=true"] if tied else []
    rcfg = run_cfg(["train.batch_size=2", "train.seq_len=16", *extra])
    cfg = rcfg.model_config()
    model = model_lib.build(cfg)
    params = init_params(model, cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, (2, 16)).astype(np.int32))
    seg = np.ones((2, 16), np.int32)
    seg[1, 9:] = 2  # a second document: targets across the boundary do not count
    seg[0, 13:] = 0  # padding
    batch = {"tokens": tokens, "segment_ids": jnp.asarray(seg)}
    out = {}
    for chunked in (True, False):
        obj = make_objective(model, cfg, rcfg.train, chunked_ce=chunked)

        def loss(p):
            total, n, _ = obj.loss_terms(p, batch, jax.random.key(0), True)
            return total / n
        out[chunked] = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(float(out[True][0]), float(out[False][0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_dpo_objective_chunked_equals_logits_path():
    rcfg = run_cfg(["train.objective=dpo", "data.source=synthetic", "train.batch_size=2", "train.seq_len=16"])
    cfg = rcfg.model_config()
    model = model_lib.build(cfg)
    params = init_params(model, cfg, jax.random.key(1))
    ref = jax.tree.map(lambda a: a * 1.01, init_params(model, cfg, jax.random.key(1)))
    rng = np.random.default_rng(0)
    batch = {}
    for prefix in ("", "rejected_"):
        mask = np.zeros((2, 16), np.int32)
        mask[:, 6:14] = 1  # the response
        seg = np.ones((2, 16), np.int32)
        seg[:, 14:] = 0  # padding
        batch.update({prefix + "tokens": jnp.asarray(rng.integers(4, cfg.vocab_size, (2, 16)).astype(np.int32)),
                      prefix + "segment_ids": jnp.asarray(seg), prefix + "loss_mask": jnp.asarray(mask)})
    out = {}
    for chunked in (True, False):
        obj = make_objective(model, cfg, rcfg.train, chunked_ce=chunked)

        def loss(p):
            total, n, extra = obj.loss_terms(p, batch, jax.random.key(0), True, ref)
            return total / n, extra["reward_margin"]
        out[chunked] = jax.value_and_grad(loss, has_aux=True)(params)
    (l1, m1), g1 = out[True]
    (l0, m0), g0 = out[False]
    assert abs(float(m0)) > 1e-3  # the policy and the reference differ: the margin is not trivially 0
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    # the margin is a difference of sequence log-probs of ~40 nats each: f32 rounding of those, not of the margin
    np.testing.assert_allclose(float(m1), float(m0), atol=2e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_first_20_losses_equal_the_logits_path():
    """A fixed-seed run: the chunked loss must not change the training curve (float tolerance)."""
    rcfg = run_cfg(["train.batch_size=4", "train.seq_len=32", "optim.lr=3e-3", "optim.warmup_steps=0"])
    cfg = rcfg.model_config()
    model = model_lib.build(cfg)
    rng = np.random.default_rng(0)
    batches = [{"tokens": jnp.asarray(rng.integers(4, 64, (4, 32)).astype(np.int32)),
                "segment_ids": jnp.ones((4, 32), jnp.int32)} for _ in range(4)]
    curves = {}
    for chunked in (True, False):
        opt = make_optimizer(rcfg.optim, 20)
        params = init_params(model, cfg, jax.random.key(0))
        state = {"step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": opt.init(params)}
        step = make_train_step(model, cfg, rcfg, opt, objective=make_objective(model, cfg, rcfg.train,
                                                                                 chunked_ce=chunked))
        losses = []
        for i in range(20):
            state, m = step(state, batches[i % 4])
            losses.append(float(m["loss"]))
        curves[chunked] = np.array(losses)
    assert curves[True][-1] < curves[True][0] - 0.5  # it trains
    np.testing.assert_allclose(curves[True], curves[False], rtol=2e-5)


def test_compiled_temp_memory_drops_by_the_logits():
    """Compile only: the chunked step's temp memory is below the logits step's by more than one f32 [B, T, V]."""
    rcfg = run_cfg(["train.batch_size=4", "train.seq_len=256", "model.vocab_size=8192", "model.max_seq_len=256"])
    cfg = rcfg.model_config()
    model = model_lib.build(cfg)
    opt = make_optimizer(rcfg.optim, 10)
    state = abstract_train_state(model, cfg, rcfg, opt, *_one_device_mesh(rcfg))
    batch = abstract_batch(cfg, rcfg)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    temp = {}
    for chunked in (True, False):
        step = make_train_step(model, cfg, rcfg, opt, objective=make_objective(model, cfg, rcfg.train,
                                                                                 chunked_ce=chunked))
        temp[chunked] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    btv = 4 * 256 * 8192 * 4
    assert temp[False] - temp[True] >= btv, (temp, btv)


def _one_device_mesh(rcfg):
    from jaxtx.train.loop import make_run_mesh
    return make_run_mesh(rcfg)
