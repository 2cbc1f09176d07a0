"""Flash attention: exact online-softmax attention that never materializes the [T, S] scores.

Bodies: `blockwise` (pure JAX lax loops, CPU / any platform), `gpu` (Pallas Triton), `tpu` (Pallas Mosaic); all share
the mask semantics and input checks in `common`, and every test compares them to `jaxtx.kernels.reference`.
"""
from jaxtx.kernels.flash_attention.blockwise import blockwise_attention
from jaxtx.kernels.flash_attention.common import BlockSizes

FLASH_BACKENDS = ("auto", "blockwise", "pallas_gpu", "pallas_tpu")


def flash_attention(q, k, v, *, causal=False, window=None, segment_ids=None, kv_segment_ids=None,
                    alibi_slopes=None, softmax_scale=None, backend="auto", block_sizes=None, interpret=False):
    """q [B, T, H, Hd], k/v [B, S, K, Hd] -> [B, T, H, Hd]. backend="auto": the Pallas kernel of the platform (TPU,
    GPU); on CPU the blockwise body, or the GPU-style Pallas kernel in interpret mode when interpret=True."""
    import jax

    from jaxtx.kernels.dispatch import attention  # late: dispatch imports this package

    if backend not in FLASH_BACKENDS:
        raise ValueError(f"flash_attention: backend={backend!r}; expected one of {FLASH_BACKENDS}")
    if backend == "auto":
        platform = jax.default_backend()
        backend = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(
            platform, "pallas_gpu" if interpret else "blockwise")
    return attention(q, k, v, causal=causal, window=window, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                     alibi_slopes=alibi_slopes, softmax_scale=softmax_scale, backend=backend,
                     block_sizes=block_sizes, interpret=interpret)


__all__ = ["BlockSizes", "blockwise_attention", "flash_attention"]
