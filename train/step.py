"""The jitted train step, the eval step, and the (abstract) train state they act on.

TrainState is a plain dict pytree, so orbax, AOT lowering and sharding trees all see the same structure:
    {"step": int32[], "skipped": int32[], "params": {...}, "opt_state": optax state, ["ref_params": {...}] (DPO)}
With a `lora:` section, "params" holds only the trainable adapter leaves (lora_a, lora_b) and the optimizer state is
theirs; "frozen" holds the base params plus the adapters' fixed lora_scale / lora_dropout. The step differentiates
with respect to "params" only, so no base gradient or base optimizer state exists; DPO's reference is the base with
the adapter off (no "ref_params" copy). `train_params(state)` is the full tree the model runs on.
The dropout/masking RNG is not state: it is fold_in(key(seed), step), so a resumed run draws the same numbers.

Call everything inside `jaxtx.sharding.use_mesh(mesh, rules)` so the model's logical constraints see the mesh.
AOT (no allocation):  state = abstract_train_state(...); batch = abstract_batch(...);
                      make_train_step(...).lower(state, batch).compile()
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtx import model as jmodel
from jaxtx import sharding as shd
from jaxtx.config import ModelConfig
from jaxtx.train.config import RunConfig
from jaxtx.train.objectives import Objective, make_objective

TrainState = dict


def batch_shapes(cfg: ModelConfig, run_cfg: RunConfig, batch_size: int | None = None) -> dict[str, tuple]:
    """Global batch arrays (all int32) the objective reads, by name -> shape."""
    t = run_cfg.train
    B, T = batch_size or t.batch_size, t.seq_len
    if t.objective == "span":
        from jaxtx.train.data import span_target_len
        To = span_target_len(run_cfg)
        return {"inputs": (B, T), "input_mask": (B, T), "decoder_inputs": (B, To), "targets": (B, To),
                "target_mask": (B, To)}
    keys = {"causal": ["tokens", "segment_ids"], "mlm": ["tokens", "segment_ids"],
            "sft": ["tokens", "segment_ids", "loss_mask"],
            "dpo": ["tokens", "segment_ids", "loss_mask", "rejected_tokens", "rejected_segment_ids",
                    "rejected_loss_mask"]}[t.objective]
    return {k: (B, T) for k in keys}


def init_call(cfg: ModelConfig) -> tuple[tuple, dict]:
    """(args, kwargs) for model.init: BERT's MLM head is created only by the masked_lm method, so init through it."""
    if cfg.kind == "encoder" and cfg.mlm_head:
        return jmodel.dummy_inputs(cfg), {"method": "masked_lm"}
    return jmodel.dummy_inputs(cfg), {}


def init_params(model, cfg: ModelConfig, rng) -> dict:
    """Unsharded params (tests, tools): the same tree the train state holds."""
    import flax.linen as nn
    args, kw = init_call(cfg)
    return nn.unbox(model.init(rng, *args, **kw))["params"]


def abstract_batch(cfg: ModelConfig, run_cfg: RunConfig, mesh=None, rules=None) -> dict:
    sh = shd.batch_sharding(mesh, rules) if mesh is not None else None
    return {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sh) for k, s in batch_shapes(cfg, run_cfg).items()}


def train_params(state: TrainState) -> dict:
    """The params tree the model runs on: the base with the adapters when the run trains LoRA."""
    if "frozen" not in state:
        return state["params"]
    from jaxtx import lora
    return lora.combine(state["frozen"], state["params"])


def _adapters(cfg: ModelConfig, run_cfg: RunConfig, rng) -> tuple[dict, dict]:
    """(trainable lora_a/lora_b, frozen lora_scale/lora_dropout) for the run's `lora:` section (host arrays)."""
    from jaxtx import lora
    from jaxtx.layers.common import dtype_of
    return lora.split(lora.init_adapters(cfg, run_cfg.lora, rng, dtype_of(cfg.param_dtype)))


def _lora_rng(run_cfg: RunConfig):
    """The adapters' init key: a function of train.seed alone, so the abstract state and the real one agree."""
    return jax.random.fold_in(jax.random.key(run_cfg.train.seed), 1013)


def state_shardings(model, cfg: ModelConfig, run_cfg: RunConfig, optimizer, mesh, rules) -> tuple[dict, dict]:
    """(abstract state whose ShapeDtypeStructs carry shardings, sharding tree) — nothing is allocated."""
    args, kw = init_call(cfg)
    abs_params, p_sh = shd.param_shardings(model, mesh, rules, *args, **kw)
    if getattr(run_cfg, "lora", None) is not None:
        return _lora_state_shardings(model, cfg, run_cfg, optimizer, mesh, rules, abs_params, p_sh)
    o_sh = shd.opt_state_shardings(optimizer, abs_params, p_sh)
    abs_opt = jax.eval_shape(optimizer.init, abs_params)
    abs_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_opt, o_sh)
    rep = NamedSharding(mesh, P())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    abstract = {"step": scalar, "skipped": scalar, "params": abs_params, "opt_state": abs_opt}
    shardings = {"step": rep, "skipped": rep, "params": p_sh, "opt_state": o_sh}
    if run_cfg.train.objective == "dpo":
        abstract["ref_params"], shardings["ref_params"] = abs_params, p_sh
    return abstract, shardings


def lora_frozen(cfg: ModelConfig, run_cfg: RunConfig, base: dict, shardings: dict) -> dict:
    """state["frozen"] of a LoRA run: the base plus the adapters' fixed lora_scale / lora_dropout (placed as
    `shardings["frozen"]` says). A resumed run rebuilds it from the base, as checkpoints do not hold it."""
    import functools

    from jaxtx import lora, quant
    base_sh = lora.strip(shardings["frozen"])
    if run_cfg.lora.quantize and not any(quant.is_quantized(x) for x in jax.tree.leaves(
            base, is_leaf=quant.is_quantized)):  # QLoRA: quantized where it lies, never gathered
        from jaxtx.lora.qlora import quantize_base
        base = jax.jit(functools.partial(quantize_base, scheme_text=run_cfg.lora.quantize), out_shardings=base_sh)(base)
    else:
        base = jax.device_put(base, base_sh)
    extra = _adapters(cfg, run_cfg, _lora_rng(run_cfg))[1]
    return lora.combine(base, jax.device_put(extra, lora.adapters(shardings["frozen"])))


def _lora_state_shardings(model, cfg, run_cfg, optimizer, mesh, rules, abs_params, p_sh) -> tuple[dict, dict]:
    from jaxtx import lora
    if run_cfg.lora.quantize:  # QLoRA: the frozen base as QTensors, sharded component by component
        from jaxtx import quant
        from jaxtx.lora.qlora import quantize_base
        plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abs_params)
        q_abs = jax.eval_shape(lambda p: quantize_base(p, run_cfg.lora.quantize), plain)
        p_sh = quant.shardings(model, q_abs, mesh, rules)
        abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), q_abs, p_sh)
    trainable, extra = _adapters(cfg, run_cfg, _lora_rng(run_cfg))
    a_sh = lora.adapter_shardings(lora.combine(trainable, extra), p_sh)
    t_sh, e_sh = lora.split(a_sh)
    to_abs = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype, sharding=s), tree, sh)
    abs_t = to_abs(trainable, t_sh)
    o_sh = shd.opt_state_shardings(optimizer, abs_t, t_sh)
    abs_opt = jax.eval_shape(optimizer.init, abs_t)
    abs_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_opt, o_sh)
    rep = NamedSharding(mesh, P())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    abstract = {"step": scalar, "skipped": scalar, "params": abs_t, "opt_state": abs_opt,
                "frozen": lora.combine(abs_params, to_abs(extra, e_sh))}
    shardings = {"step": rep, "skipped": rep, "params": t_sh, "opt_state": o_sh, "frozen": lora.combine(p_sh, e_sh)}
    return abstract, shardings


def abstract_train_state(model, cfg: ModelConfig, run_cfg: RunConfig, optimizer, mesh, rules) -> dict:
    """The train state as ShapeDtypeStructs with shardings (AOT lowering, orbax restore targets)."""
    return state_shardings(model, cfg, run_cfg, optimizer, mesh, rules)[0]


def init_train_state(model, cfg: ModelConfig, run_cfg: RunConfig, optimizer, mesh, rules, rng,
                     params: Any = None) -> TrainState:
    """Params initialized directly in their shards (or given, e.g. from train.init_from), optimizer state likewise."""
    _, sh = state_shardings(model, cfg, run_cfg, optimizer, mesh, rules)
    if params is None:
        args, kw = init_call(cfg)
        params = shd.init_sharded(model, rng, mesh, rules, *args, **kw)
    elif "frozen" not in sh:
        params = jax.device_put(params, sh["params"])
    if "frozen" in sh:  # LoRA: `params` above is the frozen base; the adapters are what trains
        from jaxtx import lora
        base = params
        if base is None:
            args, kw = init_call(cfg)
            base = shd.init_sharded(model, rng, mesh, rules, *args, **kw)
        trainable = jax.device_put(_adapters(cfg, run_cfg, _lora_rng(run_cfg))[0], sh["params"])
        frozen = lora_frozen(cfg, run_cfg, lora.strip(base), sh)
        return {"step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"]),
                "skipped": jax.device_put(jnp.zeros((), jnp.int32), sh["skipped"]),
                "params": trainable, "opt_state": shd.init_opt_state(optimizer, trainable, sh["params"]),
                "frozen": frozen}
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"]),
             "skipped": jax.device_put(jnp.zeros((), jnp.int32), sh["skipped"]),
             "params": params, "opt_state": shd.init_opt_state(optimizer, params, sh["params"])}
    if run_cfg.train.objective == "dpo":  # a copy: the policy's buffers are donated every step
        state["ref_params"] = jax.tree.map(jnp.copy, params)
    return state


def _micro_batches(batch: dict, n: int) -> dict:
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def make_train_step(model, cfg: ModelConfig, run_cfg: RunConfig, optimizer: optax.GradientTransformation, *,
                    objective: Objective | None = None, mesh=None, rules=None, shardings: dict | None = None,
                    donate: bool = True):
    """jit(step)(state, batch) -> (state, metrics). metrics: float32 scalars loss, aux_loss, grad_norm, lr, tokens
    (loss terms counted), finite (1.0/0.0), skipped, plus objective extras (DPO reward_acc, reward_margin).

    With a mesh, state and batch shardings are fixed (in = out for the state, which is donated). A non-finite loss or
    gradient leaves params and optimizer state unchanged (lax.cond, no copy) and increments `skipped`; the host decides
    whether that stops the run.
    """
    objective = objective or make_objective(model, cfg, run_cfg.train)
    schedule_lr = _schedule_of(run_cfg)
    accum, seed = run_cfg.optim.grad_accum, run_cfg.train.seed

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        ref = state.get("ref_params")
        frozen = state.get("frozen")

        def terms(params, micro, r):
            if frozen is not None:  # LoRA: only the adapter leaves are differentiated
                from jaxtx import lora
                params = lora.combine(frozen, params)
            total, n, extra = objective.loss_terms(params, micro, r, True, ref)
            return total, (n, extra)

        value_and_grad = jax.value_and_grad(terms, has_aux=True)
        if accum == 1:
            # differentiate total / n (n counts targets: it does not depend on params), so the 1/n rides on the
            # backward's scalar cotangent instead of a separate pass over every gradient (0.5 GB at 134M params)
            def mean_terms(params, micro, r):
                total, (n, extra) = terms(params, micro, r)
                return total / jnp.maximum(n, 1.0), (total, n, extra)
            (_, (total, n, extra)), grads = jax.value_and_grad(mean_terms, has_aux=True)(state["params"], batch, rng)
        else:  # scan over micro-batches: one micro-batch of activations alive at a time
            micro = _micro_batches(batch, accum)

            def body(carry, xs):
                mb, i = xs
                (t_i, (n_i, e_i)), g_i = value_and_grad(state["params"], mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (t_i, n_i, e_i, g_i)), None
            (t0, (n0, e0)), g0 = jax.eval_shape(value_and_grad, state["params"],
                                                jax.tree.map(lambda v: v[0], micro), rng)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (t0, n0, e0, g0))
            (total, n, extra, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
        denom = jnp.maximum(n, 1.0)
        # in the params' dtype: an f32 denom would promote bf16 grads (model.param_dtype=bfloat16), and with them
        # Adam's moments, and the skip branch of the cond below would no longer match the update branch
        if accum > 1:
            grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
        loss = (total - extra["aux_loss"]) / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(s):
            updates, opt_state = optimizer.update(grads, s["opt_state"], s["params"])
            return {"params": optax.apply_updates(s["params"], updates), "opt_state": opt_state}

        # only what an update changes goes through the cond: a frozen base (LoRA) or a DPO reference passed through
        # it would be an operand and a result of the cond, and XLA may give the result its own buffer (a copy)
        trained = {"params": state["params"], "opt_state": state["opt_state"]}
        new = {**state, **jax.lax.cond(finite, update, lambda s: s, trained)}
        new = {**new, "step": state["step"] + 1, "skipped": state["skipped"] + (~finite).astype(jnp.int32)}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule_lr(state["step"]), "tokens": n,
                   "finite": finite.astype(jnp.float32), "skipped": new["skipped"].astype(jnp.float32),
                   **{k: v / denom for k, v in extra.items()}}
        return new, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    if shardings is None:
        shardings = state_shardings(model, cfg, run_cfg, optimizer, mesh, rules)[1]
    b_sh = shd.batch_sharding(mesh, rules)
    batch_sh = {k: b_sh for k in batch_shapes(cfg, run_cfg)}
    return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, NamedSharding(mesh, P())),
                   donate_argnums=(0,) if donate else ())


def _schedule_of(run_cfg: RunConfig):
    from jaxtx.train.optim import lr_schedule
    return lr_schedule(run_cfg.optim, run_cfg.train.steps)


def make_eval_step(model, cfg: ModelConfig, run_cfg: RunConfig, *, objective: Objective | None = None):
    """jit(eval)(params, batch, ref_params) -> (loss_sum, count) with dropout off and a fixed masking RNG."""
    objective = objective or make_objective(model, cfg, run_cfg.train)
    rng = jax.random.key(run_cfg.train.seed + 7919)

    def ev(params, batch, ref_params=None):
        total, n, extra = objective.loss_terms(params, batch, rng, False, ref_params)
        return total - extra["aux_loss"], n
    return jax.jit(ev)
