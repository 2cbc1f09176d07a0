"""jaxtx.kernels: attention for the model. `attention` dispatches to the fastest correct backend for the platform."""
from jaxtx.kernels.decode import decode_attention
from jaxtx.kernels.dispatch import attention
from jaxtx.kernels.reference import attention_reference

__all__ = ["attention", "attention_reference", "decode_attention"]
