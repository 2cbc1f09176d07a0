"""RunConfig: everything a `jaxtx train` run needs besides code, as a frozen dataclass tree.

A run config YAML has sections `model`, `data`, `optim`, `mesh`, `train` and a top-level `out_dir`. The `model` section
names a preset (`model.preset`, a name under configs/models/ or a YAML path) plus any ModelConfig field as an override.
Command-line overrides are dotted (`train.steps=200`, `model.n_layers=2`) and type-checked with the same helpers as
ModelConfig, so a typo or a wrong type fails before anything is compiled, with a message naming key, value and rule.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from jaxtx.sharding import MeshConfig
from jaxtx.config import (ConfigError, ModelConfig, coerce, configs_dir, load_model_config, parse_value,
                          unknown_key_error)

Objective = Literal["causal", "mlm", "span", "sft", "dpo"]
Source = Literal["stdlib", "text", "jsonl", "synthetic"]
Task = Literal["reverse", "copy", "sort"]
Decay = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Source = "stdlib"  # stdlib: the Python standard library's own .py files (present on every machine)
    path: Optional[str] = None  # text/jsonl: a file or a glob
    text_field: str = "text"  # jsonl field for causal/mlm/span
    prompt_field: str = "prompt"  # sft/dpo
    response_field: str = "response"  # sft
    chosen_field: str = "chosen"  # dpo
    rejected_field: str = "rejected"  # dpo
    eval_fraction: float = 0.02  # share of documents held out (every k-th document, so it is deterministic)
    max_chars: int = 0  # read at most this many characters of corpus (0 = all)
    tokenizer: Optional[str] = None  # an existing sentencepiece model; None = train one on the corpus
    tokenizer_train_chars: int = 3_000_000  # characters of corpus the tokenizer is trained on
    # source=synthetic: digit-string tasks generated from train.seed (zero download; the tiny objective configs)
    task: Task = "reverse"
    n_examples: int = 2000
    min_digits: int = 3
    max_digits: int = 8


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: Decay = "cosine"
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 = off
    grad_accum: int = 1  # micro-batches per update; train.batch_size is split into this many


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: Objective = "causal"
    steps: int = 1000
    batch_size: int = 16  # global rows per optimizer step
    seq_len: int = 256  # rows of this many tokens (encoder length for span corruption)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_ckpts: int = 3
    async_ckpt: bool = True
    skip_nonfinite: bool = False  # True: skip a non-finite update and count it; False: stop with an error
    progress: bool = True  # the tqdm bar
    samples: int = 3  # greedy samples printed at the end (decoder objectives)
    sample_tokens: int = 64
    # objective knobs
    mlm_prob: float = 0.15  # BERT: share of tokens chosen; of those 80% [MASK], 10% random, 10% kept
    noise_density: float = 0.15  # T5 span corruption
    mean_span: float = 3.0
    target_len: int = 0  # T5 decoder length (0 = derived from seq_len and noise density)
    dpo_beta: float = 0.1
    init_from: Optional[str] = None  # a checkpoint dir whose params start the run (e.g. SFT before DPO); also DPO ref


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model_preset: str
    model_overrides: tuple  # ((field, value), ...) applied to the preset
    data: DataConfig
    optim: OptimConfig
    mesh: MeshConfig  # jaxtx.sharding's: data/fsdp/tensor/expert sizes (-1 = the rest), dcn_*, rules
    train: TrainConfig
    out_dir: str

    def model_config(self) -> ModelConfig:
        return load_model_config(self.model_preset, dict(self.model_overrides))

    def to_dict(self) -> dict:
        """The resolved config: every section fully written out (the model section lists every ModelConfig field)."""
        model = {"preset": self.model_preset, **self.model_config().to_dict()}
        return {"model": model, "data": dataclasses.asdict(self.data), "optim": dataclasses.asdict(self.optim),
                "mesh": dataclasses.asdict(self.mesh), "train": dataclasses.asdict(self.train), "out_dir": self.out_dir}


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig, "train": TrainConfig}


def _section(cls, values: dict, where: str):
    types = typing.get_type_hints(cls)
    clean = {}
    for k, v in values.items():
        if k not in types:
            raise unknown_key_error(f"{where}.{cls.__name__}", k, list(types))
        clean[k] = coerce(cls.__name__, k, v, types[k])
    return cls(**clean)


def _split_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    items = []
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected the form section.key=value, e.g. train.steps=200")
        k, v = o.split("=", 1)
        items.append((k.strip(), parse_value(v)))
    return items


def resolve_run_path(path: str | Path) -> Path:
    """A YAML path, or a name under the shipped configs/ (`tiny`) or configs/runs/ (`causal`)."""
    p = Path(path)
    if p.exists():
        return p
    rel = str(path).removeprefix("configs/")  # `configs/tiny.yaml` works from any directory
    for cand in (configs_dir() / rel, configs_dir() / f"{rel}.yaml", configs_dir() / "runs" / f"{rel}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"run config {str(path)!r} not found: expected a YAML path or a name under {configs_dir()}")


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML (or start from defaults with path=None), apply dotted overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = resolve_run_path(path)
        with open(p) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping with sections model/data/optim/mesh/train, got {type(raw).__name__}")
    valid_top = ["model", "out_dir", *SECTIONS]
    for k in raw:
        if k not in valid_top:
            raise unknown_key_error(f"run config {path}", k, valid_top)
    tree = {s: dict(raw.get(s) or {}) for s in ["model", *SECTIONS]}
    out_dir = raw.get("out_dir", "runs/default")
    for key, value in _split_overrides(overrides):
        if key == "out_dir":
            out_dir = value
            continue
        section, _, field = key.partition(".")
        if section not in tree or not field:
            raise unknown_key_error("run config override", key, [f"{s}.<key>" for s in tree] + ["out_dir"])
        tree[section][field] = value
    model = tree["model"]
    preset = model.pop("preset", None)
    if preset is None:
        raise ConfigError("run config: model.preset is required (a name under configs/models/ or a YAML path)")
    cfg = RunConfig(model_preset=str(preset), model_overrides=tuple(sorted(model.items())),
                    data=_section(DataConfig, tree["data"], "data"), optim=_section(OptimConfig, tree["optim"], "optim"),
                    mesh=MeshConfig.from_dict(tree["mesh"], "mesh"), train=_section(TrainConfig, tree["train"], "train"),
                    out_dir=str(out_dir))
    validate(cfg, cfg.model_config())
    return cfg


def validate(cfg: RunConfig, model_cfg: ModelConfig) -> None:
    """Rules checkable from the config alone (data- and device-dependent checks run in the loop, before compiling)."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    for name in ["steps", "batch_size", "seq_len", "log_every", "eval_every", "ckpt_every", "keep_ckpts"]:
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
    if t.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds the model's position limit "
                          f"model.max_seq_len={model_cfg.max_seq_len}")
    if o.grad_accum < 1 or t.batch_size % o.grad_accum:
        raise ConfigError(f"optim.grad_accum={o.grad_accum}: must be >= 1 and divide train.batch_size={t.batch_size}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction}: must be in (0, 1)")
    if d.source in ("text", "jsonl") and not d.path:
        raise ConfigError(f"data.source={d.source!r} needs data.path (a file or a glob)")
    need = {"causal": "decoder", "sft": "decoder", "dpo": "decoder", "mlm": "encoder", "span": "encoder_decoder"}
    if model_cfg.kind != need[t.objective]:
        raise ConfigError(f"train.objective={t.objective!r} needs a model of kind {need[t.objective]!r}; "
                          f"model.kind={model_cfg.kind!r}")
    if t.objective in ("sft", "dpo") and d.source not in ("jsonl", "synthetic"):
        raise ConfigError(f"train.objective={t.objective!r} reads prompt/response records: set data.source=jsonl "
                          "(or synthetic)")
    if d.source == "synthetic" and not 1 <= d.min_digits <= d.max_digits:
        raise ConfigError(f"data.min_digits={d.min_digits}, data.max_digits={d.max_digits}: need 1 <= min <= max")
    if t.objective == "mlm" and not model_cfg.mlm_head:
        raise ConfigError("train.objective='mlm' needs model.mlm_head=true")
    if not 0 < t.mlm_prob < 1 or not 0 < t.noise_density < 1 or t.mean_span < 1:
        raise ConfigError(f"train.mlm_prob={t.mlm_prob}, train.noise_density={t.noise_density} must be in (0, 1) "
                          f"and train.mean_span={t.mean_span} >= 1")
    if t.dpo_beta <= 0:
        raise ConfigError(f"train.dpo_beta={t.dpo_beta}: must be > 0")
