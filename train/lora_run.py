"""The run-dir side of LoRA training: where the frozen base comes from, which base a run belongs to, and what a
checkpoint holds.

A LoRA run's checkpoints hold only the adapters and their optimizer state (state minus "frozen"). The base comes from
`train.init_from` (a jaxtx run dir, a LoRA run dir: its merged weights, or a Hugging Face folder) or, without it,
from the run's seed; `lora_base.json` in
the run dir records its source and a fingerprint of its values, and a resume on any other base is refused;
`jaxtx.run_dir.load_params` (generate, convert) loads the same base again from that record.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

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
    """The frozen base params in the model's float layout (QLoRA quantizes them afterwards, where they lie), sharded
    as the model's params are."""
    from jaxtx import run_dir as rd
    from jaxtx import sharding as shd
    from jaxtx.train.step import init_call
    args, kw = init_call(cfg)
    base_abs = lora.strip(abstract["frozen"])
    if run_cfg.lora.quantize:  # abstract['frozen'] holds the QTensor layout; the base on disk is float
        base_abs = shd.param_shardings(model, mesh, rules, *args, **kw)[0]
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
        return rd.init_params(*init_from, base_abs, f"train.init_from={path}")  # a LoRA run: merged
    return shd.init_sharded(model, jax.random.key(run_cfg.train.seed), mesh, rules, *args, **kw)


def fingerprint(params: dict) -> str:
    """The base's fingerprint as lora_base.json records it (jaxtx.run_dir.base_fingerprint)."""
    from jaxtx import run_dir as rd
    return rd.base_fingerprint(params)


def base_record(run_cfg, base: dict) -> dict:
    """What lora_base.json says about the base, enough for jaxtx.run_dir.load_params to load it again: its kind, the
    absolute path and checkpoint step of a jaxtx run (the newest, as train.init_from took it) or the seed of a random
    init, and its fingerprint."""
    from jaxtx import run_dir as rd
    path = run_cfg.train.init_from
    rec = {"source": str(path) if path else f"random init (train.seed={run_cfg.train.seed})"}
    if not path:
        rec.update(kind="init", seed=run_cfg.train.seed)
    elif is_hf_folder(path):
        rec.update(kind="hf", path=str(Path(path).absolute()))
    else:
        p = Path(path).absolute()
        steps = rd.checkpoint_steps(p)
        rec.update(kind="jaxtx", path=str(p), **({"step": steps[-1]} if steps else {}))
    return {**rec, "fingerprint": rd.base_fingerprint(base), "fingerprint_version": rd.FINGERPRINT_VERSION}


def check_base(run_dir: Path, run_cfg, base: dict, main_process: bool = True) -> None:
    """Record the base (source + fingerprint) on a fresh run; refuse a resume whose base differs."""
    from jaxtx import run_dir as rd
    f = Path(run_dir) / BASE_FILE
    if f.is_file():
        old = json.loads(f.read_text())
        now = rd.base_fingerprint(base, int(old.get("fingerprint_version", 1)))
        if old.get("fingerprint") != now:
            source = run_cfg.train.init_from or f"random init (train.seed={run_cfg.train.seed})"
            raise ConfigError(f"{f}: this LoRA run's adapters were trained on the base {old.get('source')!r} "
                              f"(fingerprint {str(old.get('fingerprint'))[:12]}); the base now given "
                              f"({str(source)!r}, {now[:12]}) differs: resume with the same "
                              "train.init_from, or start a new out_dir")
    elif main_process:
        f.write_text(json.dumps(base_record(run_cfg, base), indent=2) + "\n")
