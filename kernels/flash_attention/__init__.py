"""Flash attention: exact online-softmax attention that never materializes the [T, S] scores.

Bodies: `blockwise` (pure JAX lax loops, CPU / any platform), `gpu` (Pallas Triton), `tpu` (Pallas Mosaic); all share
the mask semantics and input checks in `common`, and every test compares them to `jaxtx.kernels.reference`.
The one entry point is `jaxtx.kernels.attention` (dispatch.py): backend="blockwise" / "pallas_gpu" / "pallas_tpu"
selects a body here, backend="auto" the fastest correct one for the platform.
"""
from jaxtx.kernels.flash_attention.blockwise import blockwise_attention
from jaxtx.kernels.flash_attention.common import BlockSizes

__all__ = ["BlockSizes", "blockwise_attention"]
