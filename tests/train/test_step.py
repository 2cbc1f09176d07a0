"""Optimizer and step details: weight-decay mask, schedule shape, gradient accumulation exactness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import run_cfg

from jaxtx import model as model_lib
from jaxtx.train.optim import decay_mask, lr_schedule, make_optimizer
from jaxtx.train.step import init_params, make_train_step


def test_decay_mask_only_kernels():
    cfg = run_cfg([]).model_config()
    p = jax.eval_shape(lambda: init_params(model_lib.build(cfg), cfg, jax.random.key(0)))
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(decay_mask(p))[0]}
    assert flat["['embed']['embedding']"] is False and flat["['layers']['attn_norm']['scale']"] is False
    assert flat["['layers']['mlp']['wo']['kernel']"] is True and flat["['layers']['attn']['q']['kernel']"] is True


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warmup_then_decay_to_floor(decay):
    o = run_cfg([f"optim.decay={decay}", "optim.lr=1e-3", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    s = lr_schedule(o, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(5e-4) and float(s(10)) == pytest.approx(1e-3)
    assert float(s(110)) == pytest.approx(1e-4, rel=1e-4)
    assert all(float(s(i)) >= float(s(i + 1)) for i in range(10, 110))


def test_grad_accumulation_equals_one_big_batch():
    """Micro-batches with different numbers of counted tokens: accumulating sums and dividing once must give the
    same update as the whole batch at once (a mean of micro-batch means would not)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 500, (4, 16)).astype(np.int32)
    seg = np.ones((4, 16), np.int32)
    seg[:2, 4:] = 0  # the first micro-batch counts far fewer targets than the second
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}
    out = {}
    for accum in (1, 2):
        cfg = run_cfg([f"optim.grad_accum={accum}", "train.batch_size=4", "train.seq_len=16", "optim.warmup_steps=0"])
        mc = cfg.model_config()
        m = model_lib.build(mc)
        p = init_params(m, mc, jax.random.key(0))
        opt = make_optimizer(cfg.optim, 10)
        state = {"step": jnp.int32(0), "skipped": jnp.int32(0), "params": p, "opt_state": opt.init(p)}
        state, met = make_train_step(m, mc, cfg, opt, donate=False)(state, batch)
        out[accum] = (state["params"], met)
    assert float(out[1][1]["tokens"]) == float(out[2][1]["tokens"]) == 2 * 3 + 2 * 15
    np.testing.assert_allclose(float(out[1][1]["loss"]), float(out[2][1]["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(out[1][1]["grad_norm"]), float(out[2][1]["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[2][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
