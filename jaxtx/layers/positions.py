"""Position encodings: RoPE (with linear / NTK / YaRN / Llama-3 scaling), sinusoidal, ALiBi slopes, T5 buckets.

RoPE uses the half-rotation layout of HF Llama (pairs (i, i + Hd/2)), computed in float32 like the references.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxtx.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [Hd/2] (float64 numpy, static) and the attention factor that scales cos/sin (YaRN)."""
    d = cfg.hd
    base = cfg.rope_theta
    factor = cfg.rope_factor
    if cfg.rope_scaling == "ntk":  # NTK-aware: stretch the base so the lowest frequency covers factor x the context
        base = base * factor ** (d / (d - 2))
    inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if cfg.rope_scaling == "linear":
        inv = inv / factor
    elif cfg.rope_scaling == "llama3":
        old = cfg.rope_original_max_len
        lo_wavelen = old / cfg.rope_low_freq_factor
        hi_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif cfg.rope_scaling == "yarn":
        def corr_dim(rot):
            return d * math.log(cfg.rope_original_max_len / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(cfg.yarn_beta_fast)), 0)
        high = min(math.ceil(corr_dim(cfg.yarn_beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrap = 1 - ramp  # 1 where frequencies are kept (high frequency), 0 where interpolated
        inv = (inv / factor) * (1 - extrap) + inv * extrap
        return inv, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv, 1.0


def rope_cos_sin(cfg: ModelConfig, positions_BT):
    """cos, sin [B, T, Hd] float32 for integer positions."""
    inv, attn_factor = rope_inv_freq(cfg)
    ang = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)  # [B, T, Hd/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang) * attn_factor, jnp.sin(ang) * attn_factor


def apply_rope(x_BTNh, cos_BTh, sin_BTh):
    """Rotate pairs (i, i + Hd/2) of every head: x*cos + rotate_half(x)*sin, in float32."""
    xf = x_BTNh.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos_BTh[:, :, None, :] + rot * sin_BTh[:, :, None, :]
    return out.astype(x_BTNh.dtype)


def sinusoidal(positions_BT, d: int):
    """Vaswani et al.: pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(...). Returns [B, T, d] float32."""
    inv = jnp.asarray(1.0 / 10000 ** (np.arange(0, d, 2) / d), jnp.float32)
    ang = positions_BT.astype(jnp.float32)[..., None] * inv
    return jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1).reshape(*positions_BT.shape, d)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Per-head slopes of the ALiBi paper: geometric 2^(-8/n) for n a power of two, interleaved otherwise."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return np.asarray(pow2(n_heads), np.float32)
    m = 2 ** math.floor(math.log2(n_heads))
    return np.asarray(pow2(m) + pow2(2 * m)[0::2][: n_heads - m], np.float32)


def t5_bucket(rel_pos, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5 relative-position bucket of rel_pos = key_pos - query_pos (as in the T5 paper / HF)."""
    buckets = jnp.zeros_like(rel_pos)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel_pos > 0).astype(rel_pos.dtype) * num_buckets
        n = jnp.abs(rel_pos)
    else:
        n = -jnp.minimum(rel_pos, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(rel_pos.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)
