"""QLoRA: adapters over a quantized base (jaxtx.quant QTensor kernels), and merging into one.

The base stays quantized and frozen; Dense dequantizes (or computes int8 dots) for x W and adds the float adapter
term as for a float kernel. Merging cannot stay exact: the merged kernel is requantized in the base's own scheme, and
the added error is reported next to the error the base's quantization already had.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxtx import quant


def requantize_like(x, qt):
    """x [*batch, *shape] quantized with qt's scheme and options."""
    return quant.quantize(x, qt.scheme, contract=qt.contract, n_batch=len(qt.batch_shape),
                          group_size=qt.group_size or None, double_quant=qt.scale_scales is not None,
                          w8a8=qt.compute == "w8a8")


def merge_quantized(kernel, d):
    """(requantized dequant(kernel) + d, the error merging added: max |dequant(result) - (dequant(kernel) + d)| as a
    share of max |dequant(kernel) + d|). NF4 rounds to within half its widest code gap (0.139 of a block's absmax);
    int8 within 1/254 of a channel's."""
    exact = quant.dequantize(kernel, jnp.float32) + d
    merged = requantize_like(exact, kernel)
    err = jnp.abs(quant.dequantize(merged, jnp.float32) - exact).max() / jnp.maximum(jnp.abs(exact).max(), 1e-30)
    return merged, float(err)


def quantize_base(params: dict, scheme_text: str) -> dict:
    """The base's weight matrices quantized per `scheme_text` ('nf4', 'nf4-dq', 'int8', 'int4-g64', ...); embeddings,
    head, norms and biases stay as they are (jaxtx.quant's default)."""
    scheme, opts = quant.parse_scheme(scheme_text)
    return quant.quantize_params(params, scheme, **opts)
