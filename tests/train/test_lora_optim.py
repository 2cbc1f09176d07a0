"""The optimizer of a LoRA run: state for the adapter matrices only, and the run's weight decay on them (HF Trainer +
PEFT decay lora_A / lora_B: its mask excludes only biases and LayerNorm weights)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from train_helpers import run_cfg

from jaxtx import model as model_lib
from jaxtx import sharding as shd
from jaxtx.train.loop import make_run_mesh
from jaxtx.train.optim import decay_mask, make_optimizer
from jaxtx.train.step import init_train_state, make_train_step

LORA = ["lora.r=4", "lora.alpha=8", "lora.target_modules=all-linear"]
RUN = ["optim.warmup_steps=0", "optim.decay=constant", "train.batch_size=4", "train.seq_len=16"]


def _names(tree) -> set[str]:
    return {str(getattr(p[-1], "key", p[-1])) for p, x in jax.tree_util.tree_leaves_with_path(tree) if np.ndim(x)}


def _state(extra, lora=True):
    cfg = run_cfg([*RUN, *(LORA if lora else []), *extra])
    mc = cfg.model_config()
    model = model_lib.build(mc)
    opt = make_optimizer(cfg.optim, 10)
    mesh, rules = make_run_mesh(cfg)
    with shd.use_mesh(mesh, rules):
        state = init_train_state(model, mc, cfg, opt, mesh, rules, jax.random.key(0))
        step = make_train_step(model, mc, cfg, opt, mesh=mesh, rules=rules, donate=False)
    return cfg, state, step, (mesh, rules)


def test_optimizer_state_holds_only_adapter_matrices():
    _, state, _, _ = _state([])
    assert _names(state["params"]) == {"lora_a", "lora_b"}
    # every array in the optimizer state (Adam's mu and nu) is an adapter's: no base leaf, no lora_scale/dropout
    assert _names(state["opt_state"]) == {"lora_a", "lora_b"}
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(state["params"]))
    assert all(jax.tree.leaves(decay_mask(state["params"])))  # every adapter matrix is decayed


def test_decay_mask_spares_norms_biases_embeddings():
    tree = {"embed": {"embedding": 0}, "layers": {"attn": {"q": {"kernel": 0, "bias": 0, "lora_a": 0, "lora_b": 0,
                                                                  "lora_scale": 0}}, "norm": {"scale": 0}}}
    mask = decay_mask(tree)
    assert mask["layers"]["attn"]["q"] == {"kernel": True, "bias": False, "lora_a": True, "lora_b": True,
                                           "lora_scale": False}
    assert not mask["embed"]["embedding"] and not mask["layers"]["norm"]["scale"]


def test_one_step_decays_adapters_in_closed_form():
    """AdamW (decoupled): p' = p - lr * (adam(g) + wd * p). The same step with wd and with wd = 0 differ by exactly
    -lr * wd * p on every adapter matrix (the Adam part is the same), and lora_b (zero at init) is made non-zero
    first so the check sees both matrices."""
    lr, wd = 0.01, 0.3
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, 500, (4, 16)), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}
    out = {}
    for w in (wd, 0.0):
        _, state, step, (mesh, rules) = _state([f"optim.lr={lr}", f"optim.weight_decay={w}"])
        r = np.random.default_rng(1)  # the same non-zero a and b in both runs
        state = {**state, "params": jax.tree.map(lambda x: jnp.asarray(r.normal(0, 0.1, x.shape), x.dtype),
                                                 state["params"])}
        before = jax.tree.map(np.asarray, state["params"])
        with shd.use_mesh(mesh, rules):
            new, _ = step(state, batch)
        out[w] = jax.tree.map(np.asarray, new["params"])
    diff = jax.tree.map(lambda a, b: a - b, out[wd], out[0.0])
    want = jax.tree.map(lambda p: -lr * wd * p, before)
    for (path, d), w in zip(jax.tree_util.tree_leaves_with_path(diff), jax.tree.leaves(want)):
        assert np.abs(w).max() > 1e-5, path
        np.testing.assert_allclose(d, w, rtol=1e-3, atol=1e-8, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_params_keep_bfloat16_moments():
    """model.param_dtype=bfloat16: the step's gradients stay bf16 (an f32 token count once promoted them, Adam's
    moments turned f32 and the non-finite skip branch no longer matched: the step did not trace)."""
    for lora in (False, True):
        _, state, step, (mesh, rules) = _state(["model.param_dtype=bfloat16"], lora)
        tokens = jnp.full((4, 16), 5, jnp.int32)
        with shd.use_mesh(mesh, rules):
            new, met = step(state, {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)})
        assert np.isfinite(float(met["loss"]))
        assert {x.dtype for x in jax.tree.leaves(new["opt_state"]) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
