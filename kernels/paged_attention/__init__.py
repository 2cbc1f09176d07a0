"""Paged attention: one call for a serving step over a paged KV cache, `ragged_paged_attention` (ragged.py).

Decode tokens, speculative query tokens and prefill chunks of many sequences share one flat token axis; B sequences
of T tokens each are the ragged step cu_q_lens = 0, T, 2T, ... Anatomy, one file each: ragged_common.py (the frozen
`RaggedBlockSizes` and the item plan both Pallas bodies share), ragged_gpu.py / ragged_tpu.py (the kernels),
ragged.py (the jitted wrapper that checks shapes and picks the backend through `jaxtx.kernels.dispatch`),
ragged_reference.py (the plain-jnp path, also the CPU backend).
"""
from jaxtx.kernels.paged_attention.ragged import RAGGED_BACKENDS, ragged_paged_attention
from jaxtx.kernels.paged_attention.ragged_common import RaggedBlockSizes
from jaxtx.kernels.paged_attention.ragged_reference import ragged_paged_attention_xla

__all__ = ["RAGGED_BACKENDS", "RaggedBlockSizes", "ragged_paged_attention", "ragged_paged_attention_xla"]
