"""The run-dir side of LoRA training: where the frozen base comes from, which base a run belongs to, and what a
checkpoint holds.

A LoRA run's checkpoints hold only the adapters and their optimizer state (state minus "frozen"). The base comes from
`train.init_from` (a jaxtx run dir or a Hugging Face folder) or, without it, from the run's seed; `lora_base.json` in
the run dir records its source and a fingerprint of its values, and a resume on any other base is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx import lora
from jaxtx.config import ConfigError

BASE_FILE = "lora_base.json"


def is_hf_folder(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("model*.safetensors"))


def checkpointed(state: dict) -> dict:
    """What a checkpoint holds: everything but the frozen base (LoRA) — the state itself otherwise."""
    return {k: v for k, v in state.items() if k != "frozen"}


def load_base(run_cfg, cfg, model, abstract: dict, init_from, mesh, rules) -> dict:
    """The frozen base params, sharded like abstract['frozen'] minus its LoRA leaves."""
    from jaxtx import run_dir as rd
    from jaxtx import sharding as shd
    from jaxtx.train.step import init_call
    base_abs = lora.strip(abstract["frozen"])
    path = run_cfg.train.init_from
    if path and is_hf_folder(path):
        import jaxtx.hf as hf
        hf_model, params = hf.load(path, dtype=cfg.param_dtype, scan_layers=cfg.scan_layers)
        got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
        want = jax.tree.map(lambda a: (a.shape, a.dtype), base_abs)
        if got != want:
            raise ConfigError(f"train.init_from={path!r}: the Hugging Face model ({hf_model.cfg.name}) does not fit "
                              f"model.* of this run; set the model section to the HF model's config")
        return jax.device_put(params, jax.tree.map(lambda a: a.sharding, base_abs))
    if init_from is not None:
        return rd.restore_params(*init_from, base_abs, f"train.init_from={path}")
    args, kw = init_call(cfg)
    return shd.init_sharded(model, jax.random.key(run_cfg.train.seed), mesh, rules, *args, **kw)


def fingerprint(params: dict) -> str:
    """sha256 over every leaf's path, shape, dtype and three float64 moments (sum, sum of squares, a position-weighted
    sum): computed where the shards are, so a sharded 8B base is fingerprinted without gathering it."""
    @jax.jit
    def moments(x):
        x = x.astype(jnp.float32).reshape(-1)
        w = jnp.cos(jnp.arange(x.shape[0], dtype=jnp.float32) * 0.61803)
        return jnp.stack([x.sum(), (x * x).sum(), (x * w).sum()])
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        m = np.asarray(jax.device_get(moments(leaf)), np.float64)
        h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{leaf.dtype}".encode())
        h.update(np.round(m, 4).tobytes())
    return h.hexdigest()


def check_base(run_dir: Path, run_cfg, base: dict, main_process: bool = True) -> None:
    """Record the base (source + fingerprint) on a fresh run; refuse a resume whose base differs."""
    source = run_cfg.train.init_from or f"random init (train.seed={run_cfg.train.seed})"
    ref = {"source": str(source), "fingerprint": fingerprint(base)}
    f = Path(run_dir) / BASE_FILE
    if f.is_file():
        old = json.loads(f.read_text())
        if old.get("fingerprint") != ref["fingerprint"]:
            raise ConfigError(f"{f}: this LoRA run's adapters were trained on the base {old.get('source')!r} "
                              f"(fingerprint {str(old.get('fingerprint'))[:12]}); the base now given "
                              f"({ref['source']!r}, {ref['fingerprint'][:12]}) differs: resume with the same "
                              "train.init_from, or start a new out_dir")
    elif main_process:
        f.write_text(json.dumps(ref, indent=2) + "\n")
