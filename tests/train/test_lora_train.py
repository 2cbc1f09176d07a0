"""Training with a `lora:` section: the base is frozen (no gradient, no optimizer state, checked in the compiled
step's memory), the adapter learns what the frozen base cannot, DPO's reference is the base with the adapter off."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import run_cfg

from jaxtx import lora
from jaxtx import model as model_lib
from jaxtx import sharding as shd
from jaxtx.train.loop import make_run_mesh
from jaxtx.train.optim import make_optimizer
from jaxtx.train.step import (abstract_batch, init_train_state, make_eval_step, make_train_step, state_shardings,
                              train_params)

LORA = ["lora.r=4", "lora.alpha=8", "lora.target_modules=all-linear", "optim.warmup_steps=0"]


def _setup(extra, steps=10):
    """(run config, model config, model, optimizer, mesh, rules, state) of a tiny LoRA run on one device."""
    cfg = run_cfg([*extra, "train.batch_size=4", "train.seq_len=16"])
    mc = cfg.model_config()
    model = model_lib.build(mc)
    opt = make_optimizer(cfg.optim, steps)
    mesh, rules = make_run_mesh(cfg)
    with shd.use_mesh(mesh, rules):
        state = init_train_state(model, mc, cfg, opt, mesh, rules, jax.random.key(0))
    return cfg, mc, model, opt, mesh, rules, state


def _batch(B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(rng.integers(4, 500, (B, T)), jnp.int32), "segment_ids": jnp.ones((B, T), jnp.int32)}


def test_only_adapters_train():
    cfg, mc, model, opt, mesh, rules, state = _setup(LORA)
    assert set(lora.strip(state["params"])) == set() and lora.has_lora(state["params"])  # trainable: a/b only
    # optimizer state: exactly the adapters' shapes (Adam's mu and nu), nothing of the base
    n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    assert n_opt == 2 * n_train
    base_before = jax.tree.map(np.asarray, state["frozen"])
    a_before = jax.tree.map(np.asarray, state["params"])
    with shd.use_mesh(mesh, rules):
        step = make_train_step(model, mc, cfg, opt, mesh=mesh, rules=rules)
        for i in range(2):
            state, met = step(state, _batch(seed=i))
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, state["frozen"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(b) - a).max()), a_before, state["params"])
    assert all(v > 0 for v in jax.tree.leaves(moved))  # every adapter leaf trains (b from 0, a once b is not 0)
    # the full tree the model runs on is the base arrays themselves (no copy) plus the adapters
    full = train_params(state)
    assert lora.has_lora(full)
    assert {id(x) for x in jax.tree.leaves(lora.strip(full))} <= {id(x) for x in jax.tree.leaves(state["frozen"])}


def _compiled(extra):
    cfg, mc, model, opt, mesh, rules, _ = _setup(extra)
    with shd.use_mesh(mesh, rules):
        abstract, sh = state_shardings(model, mc, cfg, opt, mesh, rules)
        step = make_train_step(model, mc, cfg, opt, mesh=mesh, rules=rules, shardings=sh)
        compiled = step.lower(abstract, abstract_batch(mc, cfg, mesh, rules)).compile()
    base_tree = lora.strip(abstract.get("frozen", abstract["params"]))
    base = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base_tree))
    return compiled.memory_analysis(), base


def test_compiled_step_holds_no_base_gradient():
    """Memory, not values: the full fine-tune step needs a gradient (and Adam moments) for every base weight; the
    LoRA step's temporaries must be smaller by at least that gradient tree, and its arguments hold no base moments.
    (Both steps also hold ~0.9 base copies of temporaries on CPU: XLA:CPU lays out transposed kernels for dx.)"""
    wide = ["model.d_model=256", "model.d_ff=1024", "model.n_heads=4", "model.n_kv_heads=4"]
    full, base_bytes = _compiled(["optim.warmup_steps=0", *wide])
    lo, base_bytes2 = _compiled([*LORA, *wide])
    assert base_bytes == base_bytes2
    assert full.temp_size_in_bytes > base_bytes  # the full step's gradient tree alone is one base copy
    assert lo.temp_size_in_bytes < full.temp_size_in_bytes - 0.9 * base_bytes, (lo.temp_size_in_bytes,
                                                                                 full.temp_size_in_bytes, base_bytes)
    # arguments: full = params + 2 moments; LoRA = base + tiny adapters and their moments
    assert full.argument_size_in_bytes > 2.5 * base_bytes
    assert lo.argument_size_in_bytes < 1.25 * base_bytes


def test_dpo_reference_is_the_base_without_adapter():
    """No ref_params copy in the LoRA DPO state; at step 0 (b = 0) policy == reference, so the margin is 0 and the
    loss is log 2 exactly as with a separate frozen copy."""
    cfg, mc, model, opt, mesh, rules, state = _setup([*LORA, "train.objective=dpo", "data.source=synthetic"])
    assert "ref_params" not in state
    b = _batch()
    rej = _batch(seed=5)
    batch = {**b, "loss_mask": jnp.ones_like(b["tokens"]), "rejected_tokens": rej["tokens"],
             "rejected_segment_ids": rej["segment_ids"], "rejected_loss_mask": jnp.ones_like(b["tokens"])}
    with shd.use_mesh(mesh, rules):
        state, met = make_train_step(model, mc, cfg, opt, mesh=mesh, rules=rules)(state, batch)
    np.testing.assert_allclose(float(met["loss"]), np.log(2), rtol=1e-6)
    assert float(met["grad_norm"]) > 0
    ev = make_eval_step(model, mc, cfg)
    total, n = ev(train_params(state), batch)
    assert np.isfinite(float(total)) and float(n) == 4


def _chains(perm, n, T, rng):
    """Rows x_0, perm[x_0], perm[perm[x_0]], ...: every next token is a fixed function of the current one."""
    x = np.zeros((n, T), np.int32)
    x[:, 0] = rng.integers(0, len(perm), n)
    for t in range(1, T):
        x[:, t] = perm[x[:, t - 1]]
    return x + 4  # ids 4.. (the special ids stay out)


def _accuracy(model, params, rows):
    logits = model.apply({"params": params}, jnp.asarray(rows))
    return float((np.asarray(jnp.argmax(logits[:, :-1], -1)) == rows[:, 1:]).mean())


@functools.lru_cache(maxsize=4)  # the float LoRA run serves two tests
def learn_permutation(extra: tuple, steps=120, seed=0):
    """Train an adapter on a frozen random base to map each token to perm[token]; (held-out accuracy, base accuracy,
    held-out loss, model, params)."""
    cfg, mc, model, opt, mesh, rules, state = _setup([*extra, "optim.lr=1e-2", "optim.warmup_steps=0",
                                                      "optim.decay=constant", "optim.weight_decay=0"], steps=steps)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(32)
    held_out = _chains(perm, 32, 16, np.random.default_rng(seed + 100))
    base_acc = _accuracy(model, lora.strip(train_params(state)), held_out)
    with shd.use_mesh(mesh, rules):
        step = make_train_step(model, mc, cfg, opt, mesh=mesh, rules=rules)
        for i in range(steps):
            rows = _chains(perm, 4, 16, rng)
            state, met = step(state, {"tokens": jnp.asarray(rows), "segment_ids": jnp.ones_like(rows)})
        params = train_params(state)
        total, n = make_eval_step(model, mc, cfg)(params, {"tokens": jnp.asarray(held_out),
                                                          "segment_ids": jnp.ones_like(held_out)})
    return _accuracy(model, params, held_out), base_acc, float(total / n), model, params


def test_adapter_learns_what_the_frozen_base_cannot():
    acc, base_acc, loss, _, _ = learn_permutation((*LORA, "lora.r=8"))
    assert base_acc < 0.1  # a random base: chance is 1/32
    assert acc > 0.95, (acc, base_acc, loss)


def test_run_dir_keeps_adapters_only_and_refuses_another_base(tmp_path):
    """A LoRA run through jaxtx.train: checkpoints hold the adapters and their optimizer state (no base), the run dir
    records the base, a resume continues from the adapters, and a resume on a different base is refused."""
    import json

    import orbax.checkpoint as ocp

    from jaxtx.config import ConfigError
    from jaxtx.train.loop import train
    out = tmp_path / "run"
    args = [*LORA, "data.source=synthetic", "train.batch_size=4", "train.steps=4", "train.ckpt_every=2",
            "train.eval_every=0", "train.progress=false", "train.samples=0", "train.async_ckpt=false",
            "train.log_every=1", f"out_dir={out}"]
    res = train(run_cfg(args), log=lambda *a, **k: None)
    assert res["status"] == "done" and lora.has_lora(res["params"])
    state = ocp.PyTreeCheckpointer().restore(out.absolute() / "checkpoints" / "4" / "state")
    assert "frozen" not in state
    names = {str(getattr(p[-1], "key", p[-1])) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
    assert names == {"lora_a", "lora_b"}
    ref = json.loads((out / "lora_base.json").read_text())
    assert ref["source"].startswith("random init") and len(ref["fingerprint"]) == 64
    res2 = train(run_cfg([*args[:-4], "train.steps=6", *args[-3:]]), log=lambda *a, **k: None)
    assert res2["step"] == 6
    (out / "lora_base.json").write_text(json.dumps({**ref, "fingerprint": "0" * 64}))
    with pytest.raises(ConfigError, match="trained on the base"):
        train(run_cfg([*args[:-4], "train.steps=8", *args[-3:]]), log=lambda *a, **k: None)


def test_qlora_on_nf4_base_matches_lora_on_float_base():
    """QLoRA: the same frozen random base, NF4-quantized (block 64), trains an adapter to the held-out loss LoRA reaches
    on the float base, within 0.05 nats (stated tolerance; measured difference ~0.01). The quantized base holds no
    float kernels."""
    from jaxtx import quant
    acc_f, _, loss_f, _, _ = learn_permutation((*LORA, "lora.r=8"))
    acc_q, base_q, loss_q, model, params = learn_permutation((*LORA, "lora.r=8", "lora.quantize=nf4"))
    kernels = [x for x in jax.tree.leaves(params, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    assert kernels and all(k.scheme == "nf4" for k in kernels)
    assert base_q < 0.1 and acc_q > 0.95, (acc_q, loss_q)
    assert abs(loss_q - loss_f) < 0.05, (loss_q, loss_f)
    # merge into the NF4 base: dequantize, add, requantize; the error it adds is reported, within NF4's rounding
    merged, report = lora.merge_report(model, params)
    assert report and 0 < max(report.values()) < 0.139
    rows = _chains(np.random.default_rng(0).permutation(32), 8, 16, np.random.default_rng(1))
    assert _accuracy(model, merged, rows) > 0.8
