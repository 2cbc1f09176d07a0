"""HF config.json <-> jaxtx ModelConfig, for the families jaxtx.hf converts.

Reads transformers 4 and 5 files alike (v5 keeps RoPE in `rope_parameters`, v4 in top-level `rope_theta` +
`rope_scaling`) and writes both spellings, so a saved directory loads in either version.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxtx.config import ConfigError, ModelConfig

SUPPORTED = ("llama", "mistral", "mixtral", "gpt2", "bert", "t5")
ROPE_FAMILIES = ("llama", "mistral", "mixtral")

# HF activation names -> jaxtx. gelu_new / gelu_pytorch_tanh are the tanh approximation; gelu / gelu_python are erf.
_ACT = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


class HFConversionError(ValueError):
    """A checkpoint or config that jaxtx cannot convert; the message lists every offending name."""


class _Fields(dict):
    """config.json fields. A field read with [] is required: absent or null raises one error naming the file and
    the field (a plain dict would raise a bare KeyError: 'n_embd' traceback). .get() reads optional fields."""

    def __init__(self, d: dict, source: str, what: str):
        super().__init__(d)
        self.source, self.what = source, what

    def __getitem__(self, key):
        value = self.get(key)
        if value is None:
            raise HFConversionError(f"{self.source}: missing required field {key!r} ({self.what})")
        return value

    def get(self, key, default=None):
        value = super().get(key)
        return default if value is None else value  # HF writes null for "not set", as good as absent


# Numeric config.json fields and the type they must have; checked up front so that a string or a list fails naming
# its field instead of deep inside ModelConfig or int()/float().
_INT_FIELDS = {"vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
               "head_dim", "intermediate_size", "max_position_embeddings", "sliding_window", "num_local_experts",
               "num_experts_per_tok", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "type_vocab_size",
               "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance"}
_FLOAT_FIELDS = {"rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta", "router_aux_loss_coef"}
_STR_FIELDS = {"hidden_act", "activation_function", "feed_forward_proj", "position_embedding_type"}


def _check_types(d: dict, source: str) -> None:
    for k, v in d.items():
        if v is None:
            continue
        if k in _INT_FIELDS and (isinstance(v, bool) or not isinstance(v, int)):
            raise HFConversionError(f"{source}: {k}={v!r}, expected an integer")
        if k in _FLOAT_FIELDS and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise HFConversionError(f"{source}: {k}={v!r}, expected a number")
        if k in _STR_FIELDS and not isinstance(v, str):
            raise HFConversionError(f"{source}: {k}={v!r}, expected a string")


def _act(hf_name: str, field: str, source: str) -> str:
    if hf_name not in _ACT:
        raise HFConversionError(f"{source}: {field}={hf_name!r}: unsupported activation; "
                                f"expected one of {sorted(_ACT)}")
    return _ACT[hf_name]


def _rope(d: _Fields) -> dict:
    """rope_theta + scaling fields from a v5 `rope_parameters` or a v4 `rope_theta`/`rope_scaling` config."""
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(d.get(key) or {}, dict):
            raise HFConversionError(f"{d.source}: {key}={d[key]!r}, expected an object (or null)")
    p = _Fields(d.get("rope_parameters") or {}, d.source, "in rope_parameters")
    theta = p.get("rope_theta", d.get("rope_theta", 10000.0))
    if p.get("rope_type", "default") == "default" and d.get("rope_scaling"):
        p = _Fields(d["rope_scaling"], d.source, "in rope_scaling")  # a v4 file
    _check_types(p, f"{d.source} rope parameters")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
              "original_max_position_embeddings"):
        if p.get(k) is not None and (isinstance(p[k], bool) or not isinstance(p[k], (int, float))):
            raise HFConversionError(f"{d.source}: rope {k}={p[k]!r}, expected a number")
    kind = p.get("rope_type", p.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(p["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(p["factor"]),
                "rope_original_max_len": int(p["original_max_position_embeddings"]),
                "rope_low_freq_factor": float(p["low_freq_factor"]),
                "rope_high_freq_factor": float(p["high_freq_factor"])}
    if kind == "yarn":
        extra = {k for k in ("attention_factor", "mscale", "mscale_all_dim", "truncate") if p.get(k) is not None}
        if extra:
            raise HFConversionError(f"{d.source} rope_parameters: YaRN options {sorted(extra)} are not supported by "
                                    "jaxtx (only factor, original_max_position_embeddings, beta_fast, beta_slow)")
        return {**out, "rope_scaling": "yarn", "rope_factor": float(p["factor"]),
                "rope_original_max_len": int(p.get("original_max_position_embeddings")
                                              or d["max_position_embeddings"]),
                "yarn_beta_fast": float(p.get("beta_fast", 32.0)), "yarn_beta_slow": float(p.get("beta_slow", 1.0))}
    raise HFConversionError(f"{d.source}: rope type {kind!r}: unsupported; jaxtx converts default, linear, llama3, "
                            "yarn")


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """A jaxtx ModelConfig equivalent to an HF config.json dict (float32; `load` adjusts dtype and tying).
    `source` names the file in error messages."""
    if not isinstance(d, dict):
        raise HFConversionError(f"{source}: a JSON {type(d).__name__}, expected an object of config fields")
    mt = d.get("model_type")
    if mt is None:
        raise HFConversionError(f"{source}: missing required field 'model_type'; expected one of {list(SUPPORTED)}")
    if mt not in SUPPORTED:
        raise HFConversionError(f"{source}: model_type={mt!r}: unsupported; jaxtx.hf converts {list(SUPPORTED)}")
    _check_types(d, source)
    d = _Fields(d, source, f"model_type {mt}")
    name = str(d.get("_name_or_path") or mt)
    if mt in ROPE_FAMILIES:
        D, H = d["hidden_size"], d["num_attention_heads"]
        kw = dict(kind="decoder", vocab_size=d["vocab_size"], d_model=D, n_layers=d["num_hidden_layers"], n_heads=H,
                  n_kv_heads=d.get("num_key_value_heads") or H, head_dim=d.get("head_dim") or D // H,
                  d_ff=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 2048), norm="rmsnorm",
                  norm_eps=float(d.get("rms_norm_eps", 1e-6)), position="rope", **_rope(d),
                  activation=_act(d.get("hidden_act", "silu"), "hidden_act", source), gated=True,
                  qkv_bias=bool(d.get("attention_bias", False)), out_bias=bool(d.get("attention_bias", False)),
                  mlp_bias=bool(d.get("mlp_bias", False)),
                  tie_embeddings=bool(d.get("tie_word_embeddings", False)))
        if mt in ("mistral", "mixtral") and d.get("sliding_window"):
            kw["window"] = int(d["sliding_window"])
        if mt == "mixtral":
            kw.update(num_experts=d["num_local_experts"], experts_per_token=d["num_experts_per_tok"],
                      router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.02)))
    elif mt == "gpt2":
        D = d["n_embd"]
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
            raise HFConversionError(f"{source}: gpt2 scale_attn_by_inverse_layer_idx=true or "
                                    "scale_attn_weights=false is not supported (jaxtx scales by Hd**-0.5)")
        kw = dict(kind="decoder", vocab_size=d["vocab_size"], d_model=D, n_layers=d["n_layer"], n_heads=d["n_head"],
                  d_ff=d.get("n_inner") or 4 * D, max_seq_len=d["n_positions"], norm="layernorm", norm_bias=True,
                  norm_eps=float(d.get("layer_norm_epsilon", 1e-5)), position="learned", qkv_bias=True,
                  out_bias=True, activation=_act(d.get("activation_function", "gelu_new"), "activation_function",
                                                 source),
                  gated=False, mlp_bias=True, tie_embeddings=True)
    elif mt == "bert":
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise HFConversionError(f"{source}: position_embedding_type={d['position_embedding_type']!r}: only "
                                    "'absolute' is supported")
        kw = dict(kind="encoder", vocab_size=d["vocab_size"], d_model=d["hidden_size"],
                  n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"], d_ff=d["intermediate_size"],
                  max_seq_len=d["max_position_embeddings"], norm="layernorm", norm_bias=True,
                  norm_eps=float(d.get("layer_norm_eps", 1e-12)), norm_position="post", final_norm=False,
                  embed_norm=True, position="learned", qkv_bias=True, out_bias=True,
                  activation=_act(d.get("hidden_act", "gelu"), "hidden_act", source), gated=False, mlp_bias=True,
                  tie_embeddings=True, type_vocab_size=d.get("type_vocab_size", 2), pooler=True, mlm_head=True)
    else:  # t5
        proj = d.get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
        # v1.0 ties the head and scales the decoder output by D**-0.5; v1.1 / flan do neither. transformers 5 always
        # writes tie_word_embeddings=true and records the scaling in scale_decoder_outputs.
        rescale = bool(d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True)))
        kw = dict(kind="encoder_decoder", vocab_size=d["vocab_size"], d_model=d["d_model"],
                  n_layers=d["num_layers"], n_decoder_layers=d.get("num_decoder_layers") or d["num_layers"],
                  n_heads=d["num_heads"], head_dim=d["d_kv"], d_ff=d["d_ff"], max_seq_len=d.get("n_positions", 512),
                  norm="rmsnorm", norm_eps=float(d.get("layer_norm_epsilon", 1e-6)), position="t5",
                  t5_num_buckets=d.get("relative_attention_num_buckets", 32),
                  t5_max_distance=d.get("relative_attention_max_distance", 128), softmax_scale=1.0,
                  activation=_act(act, "feed_forward_proj", source), gated=gated, tie_embeddings=rescale,
                  rescale_tied_logits=rescale)
    try:
        return ModelConfig(name=name, **kw)
    except ConfigError as e:
        raise HFConversionError(f"{source} ({mt}) maps to an invalid ModelConfig: {e}") from e


# ------------------------------------------------------------------------------------------------ jaxtx -> HF
def family_of(cfg: ModelConfig) -> str:
    """The HF model_type that expresses this config (checked exactly by `config_to_hf`)."""
    if cfg.kind == "encoder":
        return "bert"
    if cfg.kind == "encoder_decoder":
        return "t5"
    if cfg.position == "learned":
        return "gpt2"
    if cfg.is_moe:
        return "mixtral"
    return "mistral" if cfg.window is not None else "llama"


def _hf_act(act: str) -> str:
    return {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}[act]


def _rope_out(cfg: ModelConfig) -> dict:
    p: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        p.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        p.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                 high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_len)
    elif cfg.rope_scaling == "yarn":
        p.update(rope_type="yarn", factor=cfg.rope_factor, beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow,
                 original_max_position_embeddings=cfg.rope_original_max_len)
    legacy = {k: v for k, v in p.items() if k != "rope_theta"}
    return {"rope_parameters": p, "rope_theta": cfg.rope_theta,
            "rope_scaling": None if cfg.rope_scaling == "none" else legacy}


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
    """An HF config.json dict for `cfg`. Raises HFConversionError naming every field HF cannot express."""
    mt = family_of(cfg)
    if mt in ROPE_FAMILIES:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[mt]
        d = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                 num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                 head_dim=cfg.hd, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                 hidden_act=_hf_act(cfg.activation), tie_word_embeddings=cfg.tie_embeddings, **_rope_out(cfg))
        if mt == "llama":
            d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        else:
            d.update(sliding_window=cfg.window)
        if mt == "mixtral":
            d.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                     router_aux_loss_coef=cfg.router_aux_loss_coef, router_jitter_noise=0.0)
    elif mt == "gpt2":
        arch = "GPT2LMHeadModel"
        d = dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                 n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                 activation_function=_hf_act(cfg.activation), tie_word_embeddings=True)
    elif mt == "bert":
        arch = "BertForMaskedLM" if cfg.mlm_head else "BertModel"
        d = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                 num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                 max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                 layer_norm_eps=cfg.norm_eps, hidden_act=_hf_act(cfg.activation),
                 position_embedding_type="absolute", pad_token_id=0)
    else:
        arch = "T5ForConditionalGeneration"
        act = {"gelu": "gelu_python", "gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation) if cfg.gated \
            else _hf_act(cfg.activation)
        proj = ("gated-gelu" if act == "gelu_new" else f"gated-{act}") if cfg.gated else act
        d = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.hd, d_ff=cfg.d_ff,
                 num_layers=cfg.n_layers, num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_heads,
                 relative_attention_num_buckets=cfg.t5_num_buckets,
                 relative_attention_max_distance=cfg.t5_max_distance, layer_norm_epsilon=cfg.norm_eps,
                 feed_forward_proj=proj, tie_word_embeddings=cfg.tie_embeddings,
                 scale_decoder_outputs=cfg.rescale_tied_logits, is_encoder_decoder=True, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0)
    d = {"architectures": [arch], "model_type": mt, **d, "torch_dtype": torch_dtype}
    # Exactness check: the HF config must map back to the same architecture, field by field.
    back = canonical(config_from_hf(d))
    want = canonical(cfg)
    bad = [f"{k}={getattr(cfg, k)!r} (as HF {mt}: {getattr(back, k)!r})" for k in _ARCH_FIELDS
           if getattr(back, k) != getattr(want, k)]
    if bad:
        raise HFConversionError(f"ModelConfig {cfg.name!r} has no exact HF {mt} equivalent; these fields differ: "
                                + "; ".join(bad))
    return d


# Fields that do not change the function a checkpoint computes (training, numerics, compilation, naming).
_NON_ARCH = {"name", "dropout", "init_std", "dtype", "param_dtype", "scan_layers", "remat", "attention_backend",
             "router_aux_loss_coef", "router_z_loss_coef", "capacity_factor"}
_ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NON_ARCH]


def canonical(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the fields that have no effect under its other choices reset to their defaults."""
    base = ModelConfig()
    reset = set()
    if cfg.position != "rope":
        reset |= {"rope_theta", "rope_scaling"}
    if cfg.position != "rope" or cfg.rope_scaling == "none":
        reset |= {"rope_factor", "rope_original_max_len", "rope_low_freq_factor", "rope_high_freq_factor",
                  "yarn_beta_fast", "yarn_beta_slow"}
    if cfg.rope_scaling != "llama3":
        reset |= {"rope_low_freq_factor", "rope_high_freq_factor"}
    if cfg.rope_scaling != "yarn":
        reset |= {"yarn_beta_fast", "yarn_beta_slow"}
    if cfg.position != "t5":
        reset |= {"t5_num_buckets", "t5_max_distance"}
    if cfg.position in ("rope", "t5", "alibi", "none"):
        reset.add("max_seq_len")  # only learned tables have a size
    if not cfg.is_moe:
        reset.add("experts_per_token")
    if cfg.kind != "encoder_decoder":
        reset.add("n_decoder_layers")
    changes = {k: getattr(base, k) for k in reset}
    changes["n_kv_heads"] = cfg.kv_heads
    changes["head_dim"] = cfg.hd
    if cfg.kind == "encoder_decoder":
        changes["n_decoder_layers"] = cfg.decoder_layers
    if cfg.norm == "rmsnorm":
        changes["norm_bias"] = False
    if not cfg.tie_embeddings:  # the model rescales tied logits only
        changes["rescale_tied_logits"] = False
    return dataclasses.replace(cfg, **changes)
