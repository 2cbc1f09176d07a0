"""Sizing from the config alone: parameter counts, FLOPs, KV-cache and training memory, Chinchilla-optimal sizes.

No weights are allocated. The counts are checked against `jax.eval_shape` of the real parameter tree for every preset
(tests/jaxtx/test_sizing.py), so they cannot drift from the model.

FLOP conventions (Kaplan et al. 2020, PaLM appendix B):
- forward FLOPs per token = 2·N + 2·n_layers·T·D, where N counts the parameters used in matmuls by one token (active
  experts only; embedding tables excluded, the output head included even when tied) and T is the context length;
- training FLOPs per token = 3 × forward (backward costs twice the forward) ≈ 6·N.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

from jaxtx.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1, "float64": 8,
               "fp8": 1}


def _size(name: str, value, minimum: int = 0):
    """A count (tokens, sequences) that must be a finite number >= minimum: a negative one gives negative bytes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected a number >= {minimum}")
    return value


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token (+ position, type) tables and the embedding norm
    attention: int  # q, k, v, o (+ biases; + cross-attention; + T5 relative tables)
    ffn: int  # dense FFN, or all experts + routers for MoE
    norms: int  # per-layer and final norms
    head: int  # untied LM head, BERT pooler and MLM head
    ffn_active: int  # FFN parameters one token uses (top-k experts + router); == ffn for dense models

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.ffn + self.norms + self.head

    @property
    def active(self) -> int:
        return self.total - self.ffn + self.ffn_active


def _norm(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def _attn(cfg: ModelConfig) -> int:
    D, H, K, Hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd
    n = D * H * Hd + 2 * D * K * Hd + H * Hd * D
    if cfg.qkv_bias:
        n += (H + 2 * K) * Hd
    if cfg.out_bias:
        n += D
    return n


def _ffn_one(cfg: ModelConfig) -> int:
    D, F = cfg.d_model, cfg.d_ff
    n_in = 2 if cfg.gated else 1
    n = n_in * D * F + F * D
    if cfg.mlp_bias and not cfg.is_moe:
        n += n_in * F + D
    return n


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, V = cfg.d_model, cfg.vocab_size
    emb = V * D
    if cfg.position == "learned":
        emb += cfg.max_seq_len * D
    emb += cfg.type_vocab_size * D
    if cfg.embed_norm:
        emb += _norm(cfg)

    if cfg.is_moe:
        ffn_layer = D * cfg.num_experts + cfg.num_experts * _ffn_one(cfg)
        ffn_layer_active = D * cfg.num_experts + cfg.experts_per_token * _ffn_one(cfg)
    else:
        ffn_layer = ffn_layer_active = _ffn_one(cfg)

    if cfg.kind == "encoder_decoder":
        Le, Ld = cfg.n_layers, cfg.decoder_layers
        attn = Le * _attn(cfg) + Ld * 2 * _attn(cfg)
        if cfg.position == "t5":
            attn += 2 * cfg.t5_num_buckets * cfg.n_heads
        norms = (2 * Le + 3 * Ld) * _norm(cfg) + 2 * _norm(cfg)
        n_ffn_layers = Le + Ld
    else:
        L = cfg.n_layers
        attn = L * _attn(cfg)
        norms = 2 * L * _norm(cfg) + (_norm(cfg) if cfg.final_norm else 0)
        n_ffn_layers = L

    head = 0 if cfg.tie_embeddings else D * V
    if cfg.pooler:
        head += D * D + D
    if cfg.mlm_head:
        head += D * D + D + _norm(cfg) + V
    return ParamCounts(embedding=emb, attention=attn, ffn=n_ffn_layers * ffn_layer, norms=norms, head=head,
                       ffn_active=n_ffn_layers * ffn_layer_active)


def matmul_params(cfg: ModelConfig) -> int:
    """N for FLOP counting: active params minus lookup tables, plus the tied head's matmul."""
    c = param_counts(cfg)
    tables = c.embedding - (_norm(cfg) if cfg.embed_norm else 0)
    tied_head = cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0
    return c.active - tables - c.norms + tied_head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token at context length T = seq_len: 2·N + 2·n_layers·T·D."""
    _size("seq_len", seq_len)
    layers = cfg.n_layers + (2 * cfg.decoder_layers if cfg.kind == "encoder_decoder" else 0)
    return 2.0 * matmul_params(cfg) + 2.0 * layers * seq_len * cfg.d_model


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (3 × forward ≈ 6·N)."""
    return 3.0 * flops_per_token(cfg, seq_len)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16") -> int:
    """2 (K and V) · layers · kv_heads · head_dim · bytes. int8 adds a float32 scale per token per head."""
    layers = cfg.decoder_layers if cfg.kind == "encoder_decoder" else cfg.n_layers
    b = 2 * layers * cfg.kv_heads * cfg.hd * dtype_bytes(dtype)
    if dtype == "int8":
        b += 2 * layers * cfg.kv_heads * 4
    return b


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, batch: int = 1, dtype: str = "bfloat16") -> int:
    """Cache bytes for `batch` sequences of `seq_len` tokens (a sliding window caps the tokens kept)."""
    _size("seq_len", seq_len)
    _size("batch", batch)
    kept = seq_len if cfg.window is None else min(seq_len, cfg.window)
    return batch * kept * kv_cache_bytes_per_token(cfg, dtype)


def train_memory_bytes(cfg: ModelConfig, param_dtype: str = "float32", grad_dtype: str = "float32",
                       opt_dtype: str = "float32") -> dict:
    """Params + grads + Adam's two moments (activations excluded: they depend on batch, remat and sharding)."""
    n = param_counts(cfg).total
    out = {"params": n * dtype_bytes(param_dtype), "grads": n * dtype_bytes(grad_dtype),
           "adam_moments": 2 * n * dtype_bytes(opt_dtype)}
    out["total"] = sum(out.values())
    return out


def chinchilla(compute_flops: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """Compute-optimal (N params, D tokens) for C ≈ 6·N·D with D ≈ 20·N (Hoffmann et al. 2022)."""
    if not math.isfinite(compute_flops) or compute_flops <= 0:
        raise ValueError(f"compute budget {compute_flops}: must be > 0 FLOPs and finite")
    if not math.isfinite(tokens_per_param) or tokens_per_param <= 0:
        raise ValueError(f"tokens_per_param={tokens_per_param}: must be a finite number > 0")
    n = math.sqrt(compute_flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def report(cfg: ModelConfig, seq_len: int = 2048, batch: int = 1, kv_dtype: str = "bfloat16",
           compute: float | None = None, weights=None) -> str:
    """The text `jaxtx info` prints. weights: schemes whose weight bytes to list (e.g. ["int8", "nf4-dq"])."""
    _size("seq_len", seq_len, 1)
    _size("batch", batch, 1)
    c = param_counts(cfg)
    lines = [f"{cfg.name}: {cfg.kind}, L={cfg.n_layers}, D={cfg.d_model}, H={cfg.n_heads}, K={cfg.kv_heads}, "
             f"Hd={cfg.hd}, F={cfg.d_ff}, V={cfg.vocab_size}" + (f", E={cfg.num_experts} top-{cfg.experts_per_token}"
                                                                  if cfg.is_moe else ""),
             "parameters:"]
    for name in ("embedding", "attention", "ffn", "norms", "head"):
        v = getattr(c, name)
        lines.append(f"  {name:<10} {v:>16,d}  ({human(v)})")
    lines.append(f"  {'total':<10} {c.total:>16,d}  ({human(c.total)})")
    if cfg.is_moe:
        lines.append(f"  {'active':<10} {c.active:>16,d}  ({human(c.active)}) per token")
    f = flops_per_token(cfg, seq_len)
    lines += [f"FLOPs per token at T={seq_len}: forward {human(f)}, training {human(3 * f)}",
              f"KV cache ({kv_dtype}): {human_bytes(kv_cache_bytes_per_token(cfg, kv_dtype))} per token, "
              f"{human_bytes(kv_cache_bytes(cfg, seq_len, batch, kv_dtype))} for {batch} x {seq_len} tokens"]
    if weights:
        from jaxtx import quant
        lines += ["weights (quantized matrices + scales; embeddings, head, norms, router kept):"]
        lines += quant.weight_report(cfg, ["bfloat16", *weights])
    m = train_memory_bytes(cfg)
    lines.append("training memory (fp32 params, grads, Adam moments; no activations): " +
                 ", ".join(f"{k} {human_bytes(v)}" for k, v in m.items()))
    if compute is not None:  # 0 or a negative budget is refused by chinchilla, not skipped
        n, d = chinchilla(compute)
        lines.append(f"Chinchilla-optimal for C={compute:.3g} FLOPs: N={human(n)} params, D={human(d)} tokens")
    return "\n".join(lines)
