"""AdamW with warmup + cosine/linear decay, global-norm clipping and a weight-decay mask.

Decay applies to weight matrices only (leaves named `kernel`): norm scales, biases and embedding tables are left alone
(decaying an embedding pulls rare tokens to zero; decaying norm scales fights the normalization). The mask goes by leaf
name, not ndim, because with scan_layers a norm scale is stacked to [L, D] and would look like a matrix.

LoRA runs optimize only the adapter matrices (lora_a [in, r], lora_b [r, out]; jaxtx.train.step keeps the frozen base
out of the optimized tree, so it has no optimizer state at all). They are weight matrices and take the run's decay, as
PEFT under the HF Trainer does (its decay mask excludes only biases and LayerNorm weights, so lora_A/lora_B decay).
"""
from __future__ import annotations

import jax
import optax

from jaxtx.train.config import OptimConfig


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup, 1)
    end = o.lr * o.min_lr_ratio
    if o.decay == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr_ratio)
    elif o.decay == "linear":
        decay = optax.linear_schedule(o.lr, end, rest)
    else:
        decay = optax.constant_schedule(o.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


DECAYED = frozenset({"kernel", "lora_a", "lora_b"})


def decay_mask(params):
    """True where weight decay applies: weight matrices, i.e. leaves named 'kernel' and LoRA's 'lora_a' / 'lora_b'."""
    def one(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in DECAYED
    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []  # 0 or None: off
    parts.append(optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
