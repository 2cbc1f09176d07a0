"""Read the model of a training run dir (written by `jaxtx train`) without importing train.

    RUN_DIR/config.yaml               resolved run config; its `model:` section lists every ModelConfig field
    RUN_DIR/checkpoints/<step>/state  orbax pytree {"step", "params", "opt_state", ...}: only "params" is read

Used by `jaxtx convert --from-jaxtx RUN_DIR` and by jaxtx.infer (generation from a run).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from jaxtx.config import ConfigError, ModelConfig, from_dict


def is_run_dir(path) -> bool:
    path = Path(path)
    return (path / "config.yaml").exists() and (path / "checkpoints").is_dir()


def run_config(run_dir) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole resolved run config as a dict)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir}: not a training run dir (expected config.yaml and checkpoints/)")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    if not isinstance(resolved.get("model"), dict):
        raise ConfigError(f"{run_dir / 'config.yaml'}: no `model:` section with the resolved ModelConfig")
    fields = {k: v for k, v in resolved["model"].items() if k != "preset"}
    return from_dict(fields, str(run_dir / "config.yaml")), resolved


def checkpoint_steps(run_dir) -> list[int]:
    ckpt = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "state").exists())


def load_params(run_dir, step: Optional[int] = None) -> tuple[ModelConfig, dict, int]:
    """(config, params, step) of the newest finished checkpoint (or `step`), restored as the config declares."""
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    import jaxtx.model

    run_dir = Path(run_dir).absolute()
    cfg, _ = run_config(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise ConfigError(f"{run_dir / 'checkpoints'}: no finished checkpoint (expected <step>/state)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"step {step}: not in {run_dir / 'checkpoints'} (have {steps})")
    target = {"params": nn.unbox(jaxtx.model.abstract_params(jaxtx.model.build(cfg)))}
    restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    with ocp.CheckpointManager(run_dir / "checkpoints") as mngr:
        params = mngr.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
    bad = [f"{jax.tree_util.keystr(k)}: checkpoint {tuple(a.shape)} vs config {tuple(b.shape)}"
           for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(target["params"]))
           if tuple(a.shape) != tuple(b.shape)]
    if bad:
        raise ConfigError(f"{run_dir}/checkpoints/{step}: params do not match config.yaml: " + "; ".join(bad[:5]))
    return cfg, params, step
