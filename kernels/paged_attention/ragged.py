"""`ragged_paged_attention`: one attention call for a serving step that mixes decode tokens and prefill chunks.

Inputs (the engine contract, /work/briefs/engine_contract.md H6):
  q [N, H, Hd]         a flat token axis; the tokens of one sequence are contiguous
  k/v_pages            [K, P, page_size, Hd] float, or int8 with k/v_scales [K, P, page_size] (or [K, P]) f32
  page_table [R, npp]  int32; position p of sequence r lives in page page_table[r, p // page_size], offset p % ps
  kv_lens [R]          int32 tokens of sequence r INCLUDING this step's new ones (already written to the pages)
  cu_q_lens [R+1]      int32 sequence r's queries are tokens cu_q_lens[r] .. cu_q_lens[r+1] - 1
  num_seqs             int32 scalar: rows >= num_seqs are unused, tokens >= cu_q_lens[num_seqs] are padding (out 0)
Query i of sequence r (q_len = cu_q_lens[r+1] - cu_q_lens[r]) sits at position kv_lens[r] - q_len + i and sees kv
positions p <= its own (and p > own - window with a window). GQA without repeating K/V. Values are not checked (they
are traced): page table entries outside [0, P) are clamped (entries past a sequence's pages may be anything).

backend="auto": TPU -> "pallas_tpu" (Mosaic), GPU -> "pallas_gpu" (Triton), CPU -> "xla" (the jnp loops of
`ragged_reference`, or "pallas_gpu" in interpret mode when interpret=True); the map lives in `jaxtx.kernels.dispatch`.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from jaxtx.kernels.paged_attention.ragged_reference import ragged_paged_attention_xla

RAGGED_BACKENDS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, k_scales, v_scales, window,
                        softmax_scale):
    """Raises ValueError naming the offending argument and printing every shape."""
    def shape(x):
        return None if x is None else tuple(jnp.shape(x))

    def err(msg):
        raise ValueError(f"ragged_paged_attention: {msg} (q {shape(q)}, k_pages {shape(k_pages)}, v_pages "
                         f"{shape(v_pages)}, kv_lens {shape(kv_lens)}, page_table {shape(page_table)}, cu_q_lens "
                         f"{shape(cu_q_lens)}, num_seqs {shape(num_seqs)}, k_scales {shape(k_scales)}, v_scales "
                         f"{shape(v_scales)})")

    if q.ndim != 3:
        err("q must be [N, H, Hd] (a flat token axis)")
    if k_pages.ndim != 4 or shape(k_pages) != shape(v_pages):
        err("k_pages and v_pages must both be [K, P, page_size, Hd]")
    N, H, Hd = q.shape
    K, P, ps, _ = k_pages.shape
    if k_pages.shape[3] != Hd:
        err(f"page head dim {k_pages.shape[3]} != q head dim {Hd}")
    if H % K:
        err(f"query heads H={H} must be a multiple of kv heads K={K}")
    if page_table.ndim != 2:
        err("page_table must be [R, pages_per_seq]")
    R = page_table.shape[0]
    if shape(kv_lens) != (R,):
        err(f"kv_lens must be [R] = ({R},)")
    if shape(cu_q_lens) != (R + 1,):
        err(f"cu_q_lens must be [R + 1] = ({R + 1},)")
    if shape(num_seqs) != ():
        err("num_seqs must be a scalar")
    for name, x in (("kv_lens", kv_lens), ("page_table", page_table), ("cu_q_lens", cu_q_lens),
                    ("num_seqs", num_seqs)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            err(f"{name} must be integer (int32), got {jnp.result_type(x)}")
    if (k_scales is None) != (v_scales is None):
        err("give both k_scales and v_scales (int8 pages) or neither")
    for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
        if s is not None and shape(s) not in ((K, P, ps), (K, P)):
            err(f"{name} {shape(s)} must be [K, P, page_size] = {(K, P, ps)} (per token) or [K, P] (per page)")
    if jnp.issubdtype(k_pages.dtype, jnp.integer) and k_scales is None:
        err(f"integer pages ({k_pages.dtype}) need k_scales / v_scales")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window <= 0):
        err(f"window={window!r} must be a positive int or None")
    if softmax_scale is not None and not isinstance(softmax_scale, numbers.Real):
        err(f"softmax_scale={softmax_scale!r} must be a python float or None")


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "backend", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, *, kv_lens, page_table, cu_q_lens, num_seqs, k_scales=None,
                           v_scales=None, window=None, softmax_scale=None, backend="auto", interpret=False):
    """-> o [N, H, Hd] in q.dtype (shapes in the module docstring); padding tokens get 0."""
    num_seqs = jnp.asarray(num_seqs)
    check_ragged_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, k_scales, v_scales, window,
                        softmax_scale)
    if backend not in RAGGED_BACKENDS:
        raise ValueError(f"ragged_paged_attention: backend={backend!r}; expected one of {RAGGED_BACKENDS}")
    if backend == "auto":
        from jaxtx.kernels.dispatch import kernel_backend  # late: dispatch imports the kernel packages

        backend = kernel_backend("xla", interpret=interpret)
    K, P, ps, _ = k_pages.shape
    if k_scales is not None:
        if k_scales.ndim == 2:  # per page -> per token ([K, P, ps] f32 is Hd x smaller than the pages)
            k_scales = jnp.broadcast_to(k_scales[:, :, None], (K, P, ps))
            v_scales = jnp.broadcast_to(v_scales[:, :, None], (K, P, ps))
        k_scales, v_scales = k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    # entries past a sequence's pages may be anything (-1, stale): clamped, so no backend ever reads out of bounds
    # (those slots are masked anyway)
    page_table = jnp.clip(page_table.astype(jnp.int32), 0, P - 1)
    args = (q, k_pages, v_pages, kv_lens.astype(jnp.int32), page_table,
            cu_q_lens.astype(jnp.int32), num_seqs.astype(jnp.int32))
    if backend == "xla":
        return ragged_paged_attention_xla(*args, k_scales=k_scales, v_scales=v_scales, window=window, scale=scale)
    if backend == "pallas_gpu":
        from jaxtx.kernels.paged_attention.ragged_gpu import ragged_paged_attention_gpu as kernel
    else:
        from jaxtx.kernels.paged_attention.ragged_tpu import ragged_paged_attention_tpu as kernel
    return kernel(*args, k_scales=k_scales, v_scales=v_scales, window=window, scale=scale, interpret=interpret)
