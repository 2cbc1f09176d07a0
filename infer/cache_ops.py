"""Batch-row operations on the core KV cache (beam search reorders and repeats rows).

The cache's fields keep the batch axis in different places (k/v/scales/cross K/V: axis 1 after the layer axis; pos,
lengths: axis 0), so rows are taken field by field. A `KVCache.take(rows)` in core would make this file unnecessary.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxtx.cache import KVCache

_ROW_AXIS0 = ("pos", "lengths")


def take_rows(cache: KVCache, rows):
    """A cache whose row r is row `rows[r]` of the input (rows: int array, any length: repeat, reorder or select)."""
    changes = {}
    for f in dataclasses.fields(cache):
        a = getattr(cache, f.name)
        if a is not None:
            changes[f.name] = jnp.take(a, rows, axis=0 if f.name in _ROW_AXIS0 else 1)
    return cache.replace(**changes)
