"""ModelConfig: every architectural choice of the one jaxtx model, as a frozen, validated dataclass.

Presets live as YAML under configs/models/ (shipped as the `jaxtx.configs` package data). Users change any field with
dotted `key=value` overrides, which are parsed and type-checked against the field's declared type:

    cfg = load_model_config("llama3-8b", ["n_layers=2", "window=4096"])
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

Kind = Literal["decoder", "encoder", "encoder_decoder"]
Norm = Literal["rmsnorm", "layernorm"]
NormPosition = Literal["pre", "post"]
Position = Literal["none", "sinusoidal", "learned", "rope", "alibi", "t5"]
RopeScaling = Literal["none", "linear", "ntk", "yarn", "llama3"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]
DType = Literal["float32", "bfloat16", "float16", "float64"]
Backend = Literal["auto", "xla", "blockwise", "pallas_tpu", "pallas_gpu", "cudnn"]


class ConfigError(ValueError):
    """A config value broke a rule. The message names the field, the value and the rule."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One transformer. Sizes use the shape legend: V vocab, D d_model, L n_layers, H n_heads, K n_kv_heads,
    Hd head_dim, F d_ff, E num_experts."""

    name: str = "custom"
    kind: Kind = "decoder"
    vocab_size: int = 32000  # V
    d_model: int = 512  # D
    n_layers: int = 8  # L (encoder layers for encoder_decoder)
    n_decoder_layers: Optional[int] = None  # decoder L for encoder_decoder; None = n_layers
    n_heads: int = 8  # H
    n_kv_heads: Optional[int] = None  # K; None = n_heads (MHA); 1 = MQA; else GQA
    head_dim: Optional[int] = None  # Hd; None = d_model // n_heads
    d_ff: int = 2048  # F (per expert for MoE)
    max_seq_len: int = 2048  # table size for learned positions; the position limit for training

    # normalization
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-6
    norm_bias: bool = False  # LayerNorm bias (RMSNorm never has one)
    norm_position: NormPosition = "pre"
    final_norm: bool = True
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)

    # positions
    position: Position = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_original_max_len: int = 8192  # llama3 / yarn: the pre-extension context
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    t5_num_buckets: int = 32
    t5_max_distance: int = 128

    # attention
    window: Optional[int] = None  # sliding window W: query i sees keys i-W < j <= i
    qkv_bias: bool = False
    out_bias: bool = False
    softmax_scale: Optional[float] = None  # None = Hd ** -0.5; T5 uses 1.0
    attention_backend: Backend = "auto"

    # feed-forward
    activation: Activation = "silu"
    gated: bool = True  # SwiGLU (silu) / GeGLU (gelu)
    mlp_bias: bool = False

    # mixture of experts (num_experts == 0: dense FFN)
    num_experts: int = 0  # E
    experts_per_token: int = 2
    capacity_factor: Optional[float] = None  # None = dropless; else tokens past capacity are dropped
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001

    # embeddings and heads
    tie_embeddings: bool = False
    rescale_tied_logits: bool = False  # T5: logits scaled by D ** -0.5 when the head is tied
    type_vocab_size: int = 0  # BERT token types (0 = none)
    pooler: bool = False  # BERT [CLS] pooler
    mlm_head: bool = False  # BERT masked-LM head (dense + act + norm, tied decoder + bias)
    dropout: float = 0.0
    init_std: float = 0.02

    # numerics and compilation
    dtype: DType = "float32"  # compute dtype (bfloat16 on accelerators)
    param_dtype: DType = "float32"
    scan_layers: bool = True
    remat: Remat = "none"

    # ---------------------------------------------------------------- derived sizes
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hd(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def causal(self) -> bool:
        return self.kind == "decoder"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def __post_init__(self):
        types = _field_types()
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), types[f.name])
        for name, bounds in MODEL_DOMAINS.items():
            check_bounds("ModelConfig", name, getattr(self, name), **bounds)
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: "
                              "each kv head must serve the same number of query heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                              "set head_dim explicitly or pick a width that divides")
        if self.is_moe and not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"ModelConfig.experts_per_token={self.experts_per_token}: must be in "
                              f"[1, num_experts={self.num_experts}]")
        if self.position == "rope" and self.hd % 2:
            raise ConfigError(f"ModelConfig.head_dim={self.hd}: RoPE rotates pairs, head_dim must be even")
        if self.rope_scaling != "none" and self.rope_factor < 1.0:
            raise ConfigError(f"ModelConfig.rope_factor={self.rope_factor}: a context extension factor must be >= 1")
        # llama3 smooths between the two wavelength cut-offs, dividing by (high - low): equal factors give NaN
        # frequencies, a reversed pair swaps which band is scaled.
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(f"ModelConfig.rope_high_freq_factor={self.rope_high_freq_factor}: must be > "
                              f"rope_low_freq_factor={self.rope_low_freq_factor} (llama3 scaling)")
        # YaRN ramps from the dimension where beta_fast rotations fit the old context to where beta_slow do.
        if self.rope_scaling == "yarn" and self.yarn_beta_fast <= self.yarn_beta_slow:
            raise ConfigError(f"ModelConfig.yarn_beta_fast={self.yarn_beta_fast}: must be > "
                              f"yarn_beta_slow={self.yarn_beta_slow}")
        if self.position == "t5":
            # Buckets below max_exact are exact offsets, the rest log-spaced up to max_distance: the log ratio
            # log(max_distance / max_exact) must be positive. A bidirectional stack (encoder) halves the buckets
            # per direction, so it needs 4 for max_exact >= 1.
            min_buckets = 2 if self.kind == "decoder" else 4
            if self.t5_num_buckets < min_buckets:
                raise ConfigError(f"ModelConfig.t5_num_buckets={self.t5_num_buckets}: must be >= {min_buckets} "
                                  f"(kind={self.kind!r})")
            if self.t5_max_distance <= self.t5_num_buckets // 2:
                raise ConfigError(f"ModelConfig.t5_max_distance={self.t5_max_distance}: must be > "
                                  f"t5_num_buckets // 2 = {self.t5_num_buckets // 2} (the exact-offset buckets)")
        if self.kind == "encoder_decoder" and self.position not in ("t5", "none", "sinusoidal", "learned"):
            raise ConfigError(f"ModelConfig.position={self.position!r}: encoder_decoder supports t5, learned, "
                              "sinusoidal or none")
        if self.kind != "encoder" and (self.pooler or self.mlm_head or self.type_vocab_size):
            raise ConfigError(f"ModelConfig.kind={self.kind!r}: pooler, mlm_head and type_vocab_size are encoder-only")
        if self.kind == "encoder_decoder" and self.window is not None:
            raise ConfigError(f"ModelConfig.window={self.window}: sliding windows are supported for decoder and "
                              "encoder kinds only (kind='encoder_decoder')")


# The domain of every numeric ModelConfig field (a test checks that none is missing). Floats must also be finite.
_POS, _NULL = {"ge": 1}, " (or null for the default)"
MODEL_DOMAINS: dict[str, dict] = {
    "vocab_size": _POS, "d_model": _POS, "n_layers": _POS, "n_heads": _POS, "d_ff": _POS, "max_seq_len": _POS,
    "n_decoder_layers": {"ge": 1, "why": _NULL}, "n_kv_heads": {"ge": 1, "why": _NULL},
    "head_dim": {"ge": 1, "why": _NULL},
    "norm_eps": {"gt": 0},
    # theta <= 1 makes every pair rotate at least once per position: positions alias instead of being encoded
    "rope_theta": {"gt": 1, "why": " (the RoPE base, e.g. 10000)"},
    "rope_factor": {"gt": 0}, "rope_original_max_len": _POS,
    "rope_low_freq_factor": {"gt": 0}, "rope_high_freq_factor": {"gt": 0},
    "yarn_beta_fast": {"gt": 0}, "yarn_beta_slow": {"gt": 0},
    "t5_num_buckets": {"ge": 2}, "t5_max_distance": _POS,
    "window": {"ge": 1, "why": " (or null for full attention)"},
    "softmax_scale": {"gt": 0, "why": " (or null for head_dim ** -0.5)"},
    "num_experts": {"ge": 0, "why": " (0 = dense FFN)"}, "experts_per_token": _POS,
    "capacity_factor": {"gt": 0, "why": " (or null = dropless)"},
    "router_aux_loss_coef": {"ge": 0}, "router_z_loss_coef": {"ge": 0},
    "type_vocab_size": {"ge": 0, "why": " (0 = none)"},
    "dropout": {"ge": 0, "lt": 1}, "init_std": {"gt": 0},
}


def _fmt_bound(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check_bounds(owner: str, name: str, value: Any, *, gt=None, ge=None, lt=None, le=None, why: str = "") -> None:
    """ConfigError `owner.name=value: must be <rule>` unless value is None or a finite number within the bounds.

    NaN compares False with everything, so a plain `value <= 0` check lets it through; finiteness is checked first.
    """
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo = f"> {_fmt_bound(gt)}" if gt is not None else f">= {_fmt_bound(ge)}" if ge is not None else ""
    hi = f"< {_fmt_bound(lt)}" if lt is not None else f"<= {_fmt_bound(le)}" if le is not None else ""
    if lo and hi:
        rule = (f"in {'(' if gt is not None else '['}{_fmt_bound(gt if gt is not None else ge)}, "
                f"{_fmt_bound(lt if lt is not None else le)}{')' if lt is not None else ']'}")
    else:
        rule = lo or hi
    ok = math.isfinite(value) and ((gt is None or value > gt) and (ge is None or value >= ge)
                                   and (lt is None or value < lt) and (le is None or value <= le))
    if not ok:
        finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
        raise ConfigError(f"{owner}.{name}={value!r}: must be {finite}{rule}{why}")


@functools.cache
def _field_types() -> dict:
    """Resolved field types (the annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(ModelConfig)


def _check_type(name: str, value: Any, tp: Any, owner: str = "ModelConfig") -> None:
    """Raise ConfigError unless `value` fits the declared type (Literal, Optional, int, float, bool, str)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{owner}.{name}={value!r}: expected one of {list(allowed)}{extra}")
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is not None and not ok(value):
        raise ConfigError(f"{owner}.{name}={value!r}: expected {tp.__name__}, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------ YAML files
class _Loader(yaml.SafeLoader):
    """Safe YAML with two fixes for config files: a key given twice is an error (PyYAML silently keeps the last one,
    so `lr:` written twice trains with whichever came second), and `1e-4` is a float (YAML 1.1 wants `1.0e-4` and
    reads `1e-4` as a string)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding a key is not a duplicate
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                m = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", m)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(path: str | Path) -> Any:
    """Parse one YAML file; every failure is a one-line ConfigError naming the file (and line:column for syntax)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); expected a YAML file") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from e


def find_config_file(name_or_path: str | Path, folders: list[str], what: str) -> Path:
    """An existing file, or a preset name looked up as configs/<folder>/<name>[.yaml] for each folder in order.

    `configs/tiny.yaml` resolves from any working directory (the shipped configs are package data).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return path
    rel = text.removeprefix("configs/")
    cands = [configs_dir() / rel] if rel != text else []
    cands += [c for f in folders for c in (configs_dir() / f / rel, configs_dir() / f / f"{rel}.yaml")]
    for cand in [*cands, path]:  # a preset name wins over a same-named file without a .yaml suffix
        if cand.is_file():
            return cand
    if path.suffix in (".yaml", ".yml") or "/" in text:  # meant as a path, not a preset name
        kind = "a directory, expected a YAML file" if path.is_dir() else "no such file"
        raise ConfigError(f"{what} {text!r}: {kind}")
    names = sorted({p.stem for f in folders for p in (configs_dir() / f).glob("*.yaml")})
    hint = difflib.get_close_matches(text, names, n=1)
    extra = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(f"{what} {text!r} not found: expected a YAML path or one of {names}{extra}")


def load_config_file(name_or_path: str | Path, folders: list[str], what: str) -> tuple[Path, dict]:
    """find_config_file + load_yaml, and the top level must be a mapping (an empty file is {})."""
    path = find_config_file(name_or_path, folders, what)
    d = load_yaml(path)
    if d is None:
        return path, {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} keys, got {type(d).__name__}")
    return path, d


# ------------------------------------------------------------------------------------------------ overrides
def parse_value(text: str) -> Any:
    """Parse one override value with YAML rules: 3 -> int, 1e-4 -> float, true -> bool, null -> None, nan -> nan."""
    try:
        v = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:  # e.g. `a: b` inside a value: keep the text as typed
        return text
    if isinstance(v, str):  # `nan`, `inf` (YAML wants .nan / .inf): numbers, so range checks can refuse them
        try:
            return float(v)
        except ValueError:
            return v
    return v


def parse_overrides(overrides: list[str] | dict | None, example: str) -> list[tuple[str, Any]]:
    """`key=value` strings (or a dict) -> [(key, parsed value)]; `example` shows the expected form in the error."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    items = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected the form {example}")
        k, v = o.split("=", 1)
        items.append((k.strip(), parse_value(v)))
    return items


def coerce(owner: str, name: str, value: Any, tp: Any) -> Any:
    """int -> float where a float is declared; then type-check."""
    base = tp
    if typing.get_origin(tp) is typing.Union:
        base = next(a for a in typing.get_args(tp) if a is not type(None))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    _check_type(name, value, tp, owner)
    return value


def unknown_key_error(owner: str, key: str, valid: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    extra = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{owner}: unknown key {key!r}{extra}")


def from_dict(d: dict, source: str = "config") -> ModelConfig:
    """Build a ModelConfig from a mapping, rejecting unknown keys (with a suggestion) and wrong types."""
    types = _field_types()
    clean = {}
    for k, v in d.items():
        if k not in types:
            raise unknown_key_error(f"ModelConfig ({source})", k, list(types))
        clean[k] = coerce("ModelConfig", k, v, types[k])
    return ModelConfig(**clean)


def apply_overrides(cfg: ModelConfig, overrides: list[str] | dict | None) -> ModelConfig:
    """Apply `field=value` strings (or a dict) to a config; every change is type-checked and validated."""
    items = parse_overrides(overrides, "field=value, e.g. n_layers=4")
    if not items:
        return cfg
    d = cfg.to_dict()
    types = _field_types()
    for k, v in items:
        if k not in types:
            raise unknown_key_error("ModelConfig override", k, list(types))
        d[k] = coerce("ModelConfig", k, v, types[k])
    return ModelConfig(**d)


# ------------------------------------------------------------------------------------------------ presets
def configs_dir() -> Path:
    """The shipped configs/ folder (package data `jaxtx.configs`)."""
    return Path(str(importlib.resources.files("jaxtx.configs")))


def preset_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml"))


def load_model_config(preset: str | Path, overrides: list[str] | dict | None = None) -> ModelConfig:
    """A preset name under configs/models/ or a path to a YAML file, then dotted overrides."""
    path, d = load_config_file(preset, ["models"], "model preset")
    d.setdefault("name", path.stem)
    return apply_overrides(from_dict(d, str(path)), overrides)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expert_capacity(cfg: ModelConfig, n_tokens: int) -> int:
    """Slots per expert for a group of n_tokens: ceil(k * N / E * capacity_factor) (GShard), at least k."""
    assert cfg.capacity_factor is not None
    return max(cfg.experts_per_token, math.ceil(cfg.experts_per_token * n_tokens / cfg.num_experts
                                                * cfg.capacity_factor))
