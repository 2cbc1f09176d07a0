"""jaxtx.kernels (files in kernels/: `jaxtx.kernels.dispatch` lives in `kernels/dispatch.py`): attention for the
model. `attention` dispatches to the fastest correct backend for the platform. Imports nothing from the rest of
jaxtx."""
from jaxtx.kernels.decode import decode_attention
from jaxtx.kernels.dispatch import BACKENDS, attention, select_backend
from jaxtx.kernels.flash_attention import BlockSizes, blockwise_attention
from jaxtx.kernels.paged_attention import ragged_paged_attention
from jaxtx.kernels.reference import attention_reference

__all__ = ["BACKENDS", "BlockSizes", "attention", "attention_reference", "blockwise_attention", "decode_attention",
           "ragged_paged_attention", "select_backend"]
