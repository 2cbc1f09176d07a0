"""Placeholder dispatcher (the kernels work replaces this file): every backend is the XLA reference for now."""
from __future__ import annotations

from jaxtx.kernels.reference import attention_reference


def attention(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None, alibi_slopes=None,
              bias=None, softmax_scale=None, backend="auto", block_sizes=None, interpret=False):
    return attention_reference(q, k, v, causal=causal, window=window, segment_ids=segment_ids,
                               kv_segment_ids=kv_segment_ids, alibi_slopes=alibi_slopes, bias=bias,
                               softmax_scale=softmax_scale)
