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
from typing import Literal, Optional

from jaxtx.config import (ConfigError, ModelConfig, check_bounds, coerce, find_config_file, load_config_file,
                          load_model_config, parse_overrides, unknown_key_error)
from jaxtx.lora.core import LoraConfig
from jaxtx.sharding import MeshConfig

Objective = Literal["causal", "mlm", "span", "sft", "dpo"]
Source = Literal["auto", "stdlib", "text", "jsonl", "synthetic"]
Task = Literal["reverse", "copy", "sort"]
Decay = Literal["cosine", "linear", "constant"]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # data.source=auto reads a data.path ending in these as JSON Lines


def infer_source(path: Optional[str]) -> str:
    """data.source=auto: no path -> stdlib; a path (file, glob or folder) ending in .jsonl/.ndjson/.json -> jsonl;
    any other path -> text."""
    if not path:
        return "stdlib"
    return "jsonl" if path.rstrip("/").lower().endswith(JSONL_SUFFIXES) else "text"


def _check_fields(owner: str, obj, domains: dict) -> None:
    for name, bounds in domains.items():
        check_bounds(owner, name, getattr(obj, name), **bounds)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from. `source` auto (the default) is resolved on construction from `path`: no path ->
    stdlib (the Python standard library's own .py files, present on every machine); a path ending in .jsonl, .ndjson
    or .json -> jsonl (one JSON record per line); any other file, glob or folder -> text (one UTF-8 file = one
    document). An explicit source that cannot read the path (stdlib/synthetic with a path, text on a .jsonl path) is
    refused rather than silently ignoring the user's data."""

    source: Source = "auto"
    path: Optional[str] = None  # text/jsonl: a file, a glob (`data/**/*.txt`) or a folder (every file below it)
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

    def __post_init__(self):
        _check_fields("data", self, {"eval_fraction": {"gt": 0, "lt": 1}, "max_chars": {"ge": 0, "why": " (0 = all)"},
                                     "tokenizer_train_chars": {"ge": 1}, "n_examples": {"ge": 2},
                                     "min_digits": {"ge": 1}})
        if self.max_digits < self.min_digits:
            raise ConfigError(f"data.max_digits={self.max_digits}: must be >= data.min_digits={self.min_digits}")
        for name in ["path", "text_field", "prompt_field", "response_field", "chosen_field", "rejected_field",
                     "tokenizer"]:
            if getattr(self, name) == "":
                raise ConfigError(f"data.{name}='': must not be empty")
        if self.source == "auto":
            object.__setattr__(self, "source", infer_source(self.path))  # frozen: resolved once, here
        elif self.source in ("stdlib", "synthetic") and self.path:
            raise ConfigError(f"data.source={self.source!r} does not read data.path={self.path!r}: set "
                              f"data.source={infer_source(self.path)} (or data.source=auto to infer it from the path)")
        elif self.source in ("text", "jsonl") and not self.path:
            raise ConfigError(f"data.source={self.source!r} needs data.path (a file, a glob or a folder)")
        elif self.source == "text" and infer_source(self.path) == "jsonl":
            raise ConfigError(f"data.source='text' would read data.path={self.path!r} as plain text, JSON syntax "
                              "included: set data.source=jsonl (or data.source=auto)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached after warmup_steps
    # linear warmup from 0; capped at train.steps - 1 (optim.lr_schedule), so a short smoke run of a config
    # (train.steps=6 on a 10-step warmup) still reaches optim.lr instead of being refused
    warmup_steps: int = 100
    decay: Decay = "cosine"
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # AdamW decoupled decay, on weight matrices only
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0  # global-norm clipping; 0 or null = off
    grad_accum: int = 1  # micro-batches per update; train.batch_size is split into this many

    def __post_init__(self):
        # A negative lr ascends the loss, b1/b2 >= 1 never forget (b = 1 divides by 1 - b**t = 0 in the bias
        # correction), eps = 0 divides by zero where a gradient is zero: each trained "successfully" before.
        _check_fields("optim", self, {
            "lr": {"gt": 0}, "warmup_steps": {"ge": 0}, "min_lr_ratio": {"ge": 0, "le": 1},
            "weight_decay": {"ge": 0}, "b1": {"ge": 0, "lt": 1}, "b2": {"ge": 0, "lt": 1}, "eps": {"gt": 0},
            "clip_norm": {"ge": 0, "why": " (0 or null = off)"}, "grad_accum": {"ge": 1}})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: Objective = "causal"
    steps: int = 1000
    batch_size: int = 16  # global rows per optimizer step
    seq_len: int = 256  # rows of this many tokens (encoder length for span corruption)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # eval loss every this many steps and at the end; 0 = only at the end (no periodic eval)
    eval_batches: int = 4
    ckpt_every: int = 100  # checkpoint every this many steps; 0 = only the final one (and on SIGTERM/SIGINT)
    keep_ckpts: int = 3
    async_ckpt: bool = True
    skip_nonfinite: bool = False  # True: skip a non-finite update and count it; False: stop with an error
    progress: bool = True  # the tqdm bar
    samples: int = 3  # greedy samples printed at the end (decoder objectives); 0 = none
    sample_tokens: int = 64
    # objective knobs
    mlm_prob: float = 0.15  # BERT: share of tokens chosen; of those 80% [MASK], 10% random, 10% kept
    noise_density: float = 0.15  # T5 span corruption
    mean_span: float = 3.0
    target_len: int = 0  # T5 decoder length (0 = derived from seq_len and noise density)
    dpo_beta: float = 0.1
    init_from: Optional[str] = None  # a checkpoint dir whose params start the run (e.g. SFT before DPO); also DPO ref

    def __post_init__(self):
        _check_fields("train", self, {
            "steps": {"ge": 1}, "batch_size": {"ge": 1},
            "seq_len": {"ge": 2, "why": " (a causal row needs a token and its successor)"},
            # grain's shuffle takes seeds in [0, 2**32) and the span-corruption map uses seed + 1
            "seed": {"ge": 0, "lt": 2 ** 31}, "log_every": {"ge": 1},
            "eval_every": {"ge": 0, "why": " (0 = eval only at the end)"}, "eval_batches": {"ge": 1},
            "ckpt_every": {"ge": 0, "why": " (0 = only the final checkpoint)"}, "keep_ckpts": {"ge": 1},
            "samples": {"ge": 0}, "sample_tokens": {"ge": 1},
            "mlm_prob": {"gt": 0, "lt": 1}, "noise_density": {"gt": 0, "lt": 1}, "mean_span": {"ge": 1},
            "target_len": {"ge": 0, "why": " (0 = derived)"}, "dpo_beta": {"gt": 0}})
        if self.init_from == "":
            raise ConfigError("train.init_from='': must be a checkpoint dir (or null)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model_preset: str
    model_overrides: tuple  # ((field, value), ...) applied to the preset
    data: DataConfig
    optim: OptimConfig
    mesh: MeshConfig  # jaxtx.sharding's: data/fsdp/tensor/expert sizes (-1 = the rest), dcn_*, rules
    train: TrainConfig
    out_dir: str
    lora: Optional[LoraConfig] = None  # the `lora:` section: train adapters on a frozen base (jaxtx.lora)

    def model_config(self) -> ModelConfig:
        return load_model_config(self.model_preset, dict(self.model_overrides))

    def to_dict(self) -> dict:
        """The resolved config: every section fully written out (the model section lists every ModelConfig field)."""
        model = {"preset": self.model_preset, **self.model_config().to_dict()}
        out = {"model": model, "data": dataclasses.asdict(self.data), "optim": dataclasses.asdict(self.optim),
               "mesh": dataclasses.asdict(self.mesh), "train": dataclasses.asdict(self.train), "out_dir": self.out_dir}
        if self.lora is not None:
            out["lora"] = lora_section_dict(self.lora)
        return out


LORA_TYPES = {"r": int, "alpha": float, "dropout": float, "target_modules": (list, str), "rslora": bool,
              "rank_pattern": dict, "alpha_pattern": dict, "quantize": str}


def lora_section_dict(lc) -> dict:
    return {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout,
            "target_modules": lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules),
            "rslora": lc.rslora, "rank_pattern": dict(lc.rank_pattern), "alpha_pattern": dict(lc.alpha_pattern),
            "quantize": lc.quantize}


def _lora_section(values: dict):
    """The `lora:` section as a jaxtx.lora.LoraConfig (which checks each value's domain)."""
    clean = {}
    for k, v in values.items():
        if k not in LORA_TYPES:
            raise unknown_key_error("lora section", k, list(LORA_TYPES))
        tp = LORA_TYPES[k]
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if v is None and k == "quantize":
            continue
        if not isinstance(v, tp) or (tp in (int, float) and isinstance(v, bool)):
            want = {int: "an integer", float: "a number", bool: "true or false", dict: "a mapping {name: value}",
                    (list, str): "a list of module names, a regex or 'all-linear'",
                    str: "a quantization scheme such as nf4 (QLoRA)"}[tp]
            raise ConfigError(f"lora.{k}={v!r}: expected {want}")
        clean[k] = v
    return LoraConfig(**clean)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig, "train": TrainConfig}


def _section(cls, values: dict, where: str):
    """Errors name keys the way the user writes them: `optim.lr`, not `OptimConfig.lr`."""
    types = typing.get_type_hints(cls)
    clean = {}
    for k, v in values.items():
        if k not in types:
            raise unknown_key_error(f"{where} section", k, list(types))
        clean[k] = coerce(where, k, v, types[k])
    return cls(**clean)


def resolve_run_path(path: str | Path) -> Path:
    """A YAML path, or a name under the shipped configs/ (`tiny`) or configs/runs/ (`causal`)."""
    return find_config_file(path, ["", "runs"], "run config")


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML (or start from defaults with path=None), apply dotted overrides, validate."""
    raw: dict = {}
    where = "run config"
    if path is not None:
        p, raw = load_config_file(path, ["", "runs"], "run config")
        where = str(p)
    valid_top = ["model", "out_dir", "lora", *SECTIONS]
    for k in raw:
        if k not in valid_top:
            raise unknown_key_error(where, k, valid_top)
    tree = {}
    for s in ["model", "lora", *SECTIONS]:
        section = raw.get(s)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{where}: section {s!r} must be a mapping of keys, got {type(section).__name__} "
                              f"{section!r}")
        tree[s] = dict(section or {})
        bad = [k for k in tree[s] if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where}: section {s!r} has a key {bad[0]!r} that is not a name")
    out_dir = raw.get("out_dir", "runs/default")
    for key, value in parse_overrides(overrides, "section.key=value, e.g. train.steps=200"):
        if key == "out_dir":
            out_dir = value
            continue
        section, _, field = key.partition(".")
        if section not in tree or not field:
            raise unknown_key_error("run config override", key, [f"{s}.<key>" for s in tree] + ["out_dir"])
        tree[section][field] = value
    if not isinstance(out_dir, str) or not out_dir:
        raise ConfigError(f"out_dir={out_dir!r}: expected a folder path")
    model = tree["model"]
    preset = model.pop("preset", None)
    if preset is None:
        raise ConfigError("run config: model.preset is required (a name under configs/models/ or a YAML path)")
    cfg = RunConfig(model_preset=str(preset), model_overrides=tuple(sorted(model.items())),
                    data=_section(DataConfig, tree["data"], "data"),
                    optim=_section(OptimConfig, tree["optim"], "optim"),
                    mesh=MeshConfig.from_dict(tree["mesh"], "mesh"),
                    train=_section(TrainConfig, tree["train"], "train"), out_dir=str(out_dir),
                    lora=_lora_section(tree["lora"]) if tree["lora"] or "lora" in raw else None)
    validate(cfg, cfg.model_config())
    return cfg


def validate(cfg: RunConfig, model_cfg: ModelConfig) -> None:
    """Rules across fields and sections (each field's own domain is checked when its section is built; data- and
    device-dependent checks run in the loop, before compiling)."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    if t.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds the model's position limit "
                          f"model.max_seq_len={model_cfg.max_seq_len}")
    if t.batch_size % o.grad_accum:
        raise ConfigError(f"optim.grad_accum={o.grad_accum}: must be >= 1 and divide train.batch_size={t.batch_size}")
    need = {"causal": "decoder", "sft": "decoder", "dpo": "decoder", "mlm": "encoder", "span": "encoder_decoder"}
    if model_cfg.kind != need[t.objective]:
        raise ConfigError(f"train.objective={t.objective!r} needs a model of kind {need[t.objective]!r}; "
                          f"model.kind={model_cfg.kind!r}")
    if t.objective in ("sft", "dpo") and d.source not in ("jsonl", "synthetic"):
        raise ConfigError(f"train.objective={t.objective!r} reads prompt/response records, but data.source="
                          f"{d.source!r}: set data.source=jsonl with data.path=FILE.jsonl (or data.source=synthetic)")
    if cfg.lora is not None:  # targets name modules of this model; embeddings, lm_head, MoE experts are refused
        from jaxtx.lora import resolve
        resolve(model_cfg, cfg.lora)
    if t.objective == "mlm" and not model_cfg.mlm_head:
        raise ConfigError("train.objective='mlm' needs model.mlm_head=true")
