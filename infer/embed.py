"""Encoder-only sentence embeddings (BERT): mean of the last hidden states over real tokens, optionally L2-normalized.

Padding must not change an embedding, so the mean divides by the number of real tokens (not T) and padded positions
are zeroed before the sum (HF lets padded queries attend to real keys, so their hidden states are not zero).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx import decode
from jaxtx.infer import prompts


def mean_pool(hidden_BTD, mask_BT, normalize: bool = True):
    """hidden [B, T, D], mask [B, T] (1 = real token) -> [B, D] float32."""
    m = mask_BT.astype(jnp.float32)[..., None]
    pooled = jnp.sum(hidden_BTD.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


@functools.partial(jax.jit, static_argnames=("model", "normalize"))
def _embed(model, params, ids, types, mask, *, normalize):
    hidden = model.apply({"params": params}, ids, types, mask)
    return mean_pool(hidden, mask, normalize)


def embed(model, params, sentences, *, token_type_ids=None, normalize: bool = True, bucket: bool = True) -> np.ndarray:
    """Token-id lists (or a padded array; see prompts.as_rows) -> embeddings [B, D] float32 numpy."""
    if model.cfg.kind != "encoder":
        raise ValueError(f"embed: needs an encoder-only model (kind 'encoder'), got kind {model.cfg.kind!r}")
    rows = prompts.as_rows(sentences)
    prompts.validate(rows, model.cfg.vocab_size, model.cfg.max_seq_len)
    ids, lens, _ = decode.pad_batch(rows, bucket=bucket)
    mask = (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int32)
    types = np.zeros_like(ids)
    if token_type_ids is not None:
        for b, t in enumerate(token_type_ids):
            types[b, : len(t)] = t
    return np.asarray(_embed(model, params, ids, types, mask, normalize=normalize))[: len(rows)]
