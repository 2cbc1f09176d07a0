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
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _field_types()[f.name])
        positive = ["vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)}: must be >= 1")
        for name in ["n_decoder_layers", "n_kv_heads", "head_dim"]:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"ModelConfig.{name}={v}: must be >= 1 (or null for the default)")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: "
                              "each kv head must serve the same number of query heads")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                              "set head_dim explicitly or pick a width that divides")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"ModelConfig.window={self.window}: must be >= 1 (or null for full attention)")
        if self.num_experts < 0:
            raise ConfigError(f"ModelConfig.num_experts={self.num_experts}: must be >= 0 (0 = dense FFN)")
        if self.is_moe and not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"ModelConfig.experts_per_token={self.experts_per_token}: must be in "
                              f"[1, num_experts={self.num_experts}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"ModelConfig.capacity_factor={self.capacity_factor}: must be > 0 (or null = dropless)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout={self.dropout}: must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ConfigError(f"ModelConfig.norm_eps={self.norm_eps}: must be > 0")
        if self.position == "rope" and self.hd % 2:
            raise ConfigError(f"ModelConfig.head_dim={self.hd}: RoPE rotates pairs, head_dim must be even")
        if self.rope_scaling != "none" and self.rope_factor < 1.0:
            raise ConfigError(f"ModelConfig.rope_factor={self.rope_factor}: a context extension factor must be >= 1")
        if self.position == "t5" and self.t5_num_buckets < 2:
            raise ConfigError(f"ModelConfig.t5_num_buckets={self.t5_num_buckets}: must be >= 2")
        if self.kind == "encoder_decoder" and self.position not in ("t5", "none", "sinusoidal", "learned"):
            raise ConfigError(f"ModelConfig.position={self.position!r}: encoder_decoder supports t5, learned, "
                              "sinusoidal or none")
        if self.kind != "encoder" and (self.pooler or self.mlm_head or self.type_vocab_size):
            raise ConfigError(f"ModelConfig.kind={self.kind!r}: pooler, mlm_head and type_vocab_size are encoder-only")
        if self.kind == "encoder_decoder" and self.window is not None:
            raise ConfigError(f"ModelConfig.window={self.window}: sliding windows are supported for decoder and "
                              "encoder kinds only (kind='encoder_decoder')")


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


# ------------------------------------------------------------------------------------------------ overrides
def parse_value(text: str) -> Any:
    """Parse one override value with YAML rules: 3 -> int, 1e-4 -> float, true -> bool, null -> None."""
    v = yaml.safe_load(text)
    if isinstance(v, str):  # YAML 1.1 reads "1e-4" as a string; accept it as a float
        try:
            return float(v)
        except ValueError:
            return v
    return v


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
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
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
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r}: expected the form field=value, e.g. n_layers=4")
            k, v = o.split("=", 1)
            items.append((k.strip(), parse_value(v)))
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
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = configs_dir() / "models" / f"{preset}.yaml"
        if not path.exists():
            names = preset_names()
            hint = difflib.get_close_matches(str(preset), names, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"model preset {str(preset)!r} not found: expected a YAML path or one of {names}{extra}")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of ModelConfig fields, got {type(d).__name__}")
    d.setdefault("name", path.stem)
    return apply_overrides(from_dict(d, str(path)), overrides)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expert_capacity(cfg: ModelConfig, n_tokens: int) -> int:
    """Slots per expert for a group of n_tokens: ceil(k * N / E * capacity_factor) (GShard), at least k."""
    assert cfg.capacity_factor is not None
    return max(cfg.experts_per_token, math.ceil(cfg.experts_per_token * n_tokens / cfg.num_experts
                                                * cfg.capacity_factor))
