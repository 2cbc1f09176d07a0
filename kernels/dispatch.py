"""`attention`: the one entry point the model calls. Picks the fastest backend that supports the arguments.

backend="auto":
  TPU  -> "pallas_tpu" (Mosaic flash kernel)
  GPU  -> "cudnn" (jax.nn.dot_product_attention, implementation="cudnn") when it supports the arguments, else
          "pallas_gpu" (Triton flash kernel)
  CPU  -> "xla" (materialized scores, one masked softmax: flash_attention/dense.py; the reference when a bias is
          given) when T * S <= XLA_MAX_TS (512 x 512), else "blockwise" (lax-loop flash attention: O(T) memory,
          and faster from T ~ 1024 on the dev CPU)
  An additive `bias` is only taken by "xla" and "blockwise": auto then picks between those two by the same T * S rule.
A forced backend that cannot handle the arguments raises ValueError saying why; it never silently falls back.
`interpret=True` runs a forced Pallas backend in interpret mode on CPU (tests); with backend="auto" on CPU it selects
"pallas_gpu" in interpret mode.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtx.kernels.flash_attention.blockwise import blockwise_attention
from jaxtx.kernels.flash_attention.common import check_inputs
from jaxtx.kernels.flash_attention.dense import dense_attention
from jaxtx.kernels.reference import attention_reference

BACKENDS = ("auto", "xla", "blockwise", "pallas_tpu", "pallas_gpu", "cudnn")
# CPU crossover, re-measured 2026-12-02 with tools/ab_attention.py (B=8 H=12 K=12 Hd=64 f32 causal with segment ids,
# fwd+bwd, the two backends alternating in one process, median process-CPU time on the loaded 2-core machine):
# blockwise / xla = 1.34x at T = 128, 1.11x at 256, 1.14x at 512 (xla faster), 0.66x at 1024 (blockwise faster: it
# skips the masked upper triangle). "xla" is kernels/flash_attention/dense.py (one masked softmax, hand-written
# backward); it saves p, [B, H, T, S] f32 per layer, which caps it at T = S = 512 too.
XLA_MAX_TS = 512 * 512
# The one platform -> Pallas backend map of every kernel family (flash, paged, ragged paged attention).
PALLAS_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}


def kernel_backend(cpu_backend, *, interpret=False, platform=None):
    """What backend="auto" means for a kernel family: the platform's Pallas kernel; on CPU `cpu_backend` (its jnp
    body), or the GPU-style Pallas kernel in interpret mode when interpret=True (how tests run the kernels on CPU)."""
    platform = platform or jax.default_backend()
    return PALLAS_BACKEND.get(platform, "pallas_gpu" if interpret else cpu_backend)


def cudnn_unsupported_reason(q, k, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                             alibi_slopes=None, bias=None):
    """None when cuDNN flash attention computes exactly this; else a short reason."""
    T, S, Hd = q.shape[1], k.shape[1], q.shape[3]
    if bias is not None:
        return "an additive bias is only supported by the 'xla' and 'blockwise' backends"
    if alibi_slopes is not None:
        return "cuDNN has no ALiBi"
    if segment_ids is not None or kv_segment_ids is not None:
        return "cuDNN path here takes no segment ids (packed sequences / key padding)"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bf16/f16, got {q.dtype}"
    if Hd % 8 or Hd > 128:
        return f"cuDNN needs head dim a multiple of 8 and <= 128, got {Hd}"
    if window is not None and not causal:
        return "cuDNN sliding window is causal only"
    if (causal or window is not None) and T != S:
        return f"cuDNN causal masks align bottom-right; jaxtx aligns top-left (T={T} != S={S})"
    return None


def cudnn_attention(q, k, v, *, causal, window, softmax_scale, implementation="cudnn"):
    """jax.nn.dot_product_attention with jaxtx's window convention (i - W < j <= i  <=>  local window (W - 1, 0)).
    implementation="xla" runs the same mapping on any platform (tests check it against the reference)."""
    return jax.nn.dot_product_attention(q, k, v, scale=softmax_scale, is_causal=causal,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation=implementation)


def select_backend(q, k, *, bias=None, platform=None, **kw):
    """The backend backend="auto" would use for these arguments on `platform` (default: jax.default_backend())."""
    platform = platform or jax.default_backend()
    T, S = q.shape[1], k.shape[1]
    if bias is not None or platform not in PALLAS_BACKEND:
        return "xla" if T * S <= XLA_MAX_TS else "blockwise"
    if platform in ("cuda", "gpu") and cudnn_unsupported_reason(q, k, bias=bias, **kw) is None:
        return "cudnn"
    return PALLAS_BACKEND[platform]


def attention(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None, alibi_slopes=None,
              bias=None, softmax_scale=None, backend="auto", block_sizes=None, interpret=False):
    """q [B, T, H, Hd], k/v [B, S, K, Hd] (K divides H) -> [B, T, H, Hd] in q.dtype. Semantics in docs/design.md."""
    check_inputs("attention", q, k, v, window=window, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                 alibi_slopes=alibi_slopes, bias=bias)
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend={backend!r}; expected one of {BACKENDS}")
    mask_kw = dict(causal=causal, window=window, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                   alibi_slopes=alibi_slopes)
    if backend == "auto":
        if interpret and jax.default_backend() == "cpu" and bias is None:
            backend = "pallas_gpu"
        else:
            backend = select_backend(q, k, bias=bias, **mask_kw)
    if backend == "xla":
        if bias is None:  # the same scores, with a hand-written backward (dense.py)
            return dense_attention(q, k, v, softmax_scale=softmax_scale, **mask_kw)
        return attention_reference(q, k, v, bias=bias, softmax_scale=softmax_scale, **mask_kw)
    if backend == "blockwise":
        return blockwise_attention(q, k, v, bias=bias, softmax_scale=softmax_scale, block_sizes=block_sizes,
                                   **mask_kw)
    if bias is not None:
        raise ValueError(f"attention: backend={backend!r} does not take an additive bias (bias {tuple(bias.shape)});"
                         " use backend='xla' or 'blockwise' (or 'auto')")
    if backend == "cudnn":
        reason = cudnn_unsupported_reason(q, k, bias=bias, **mask_kw)
        if reason is not None:
            raise ValueError(f"attention: backend='cudnn' cannot run these arguments: {reason}")
        return cudnn_attention(q, k, v, causal=causal, window=window, softmax_scale=softmax_scale)
    if backend == "pallas_gpu":
        from jaxtx.kernels.flash_attention.gpu import flash_attention_gpu
        return flash_attention_gpu(q, k, v, softmax_scale=softmax_scale, block_sizes=block_sizes,
                                   interpret=interpret, **mask_kw)
    from jaxtx.kernels.flash_attention.tpu import flash_attention_tpu
    return flash_attention_tpu(q, k, v, softmax_scale=softmax_scale, block_sizes=block_sizes, interpret=interpret,
                               **mask_kw)
