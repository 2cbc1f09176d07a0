"""Host-side prompt preparation: validation with clear errors, right padding, and shape buckets.

Buckets bound the number of compilations when serving many prompts: the prompt length rounds up to a power of two
(at least MIN_LEN_BUCKET) and the batch to a power of two, so every batch lands on one of a few (B, T) shapes.
Padding tokens get position -1 (never written to the cache, never visible) and padding rows are marked finished
before the loop starts, so neither changes any real row's tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_LEN_BUCKET = 16


class PromptError(ValueError):
    """A prompt cannot be generated from (empty, too long for the cache, ids outside the vocabulary)."""


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def as_rows(prompts, lengths=None) -> list[np.ndarray]:
    """Token-id lists, or a padded [B, T] array with `lengths [B]`, as a list of 1-D int arrays."""
    if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise PromptError(f"prompts: expected token-id lists or a [B, T] array, got shape {arr.shape}")
        lens = np.full(arr.shape[0], arr.shape[1]) if lengths is None else np.asarray(lengths)
        if lens.shape != (arr.shape[0],):
            raise PromptError(f"lengths: expected shape ({arr.shape[0]},) for prompts {arr.shape}, got {lens.shape}")
        return [arr[b, : int(lens[b])] for b in range(arr.shape[0])]
    if lengths is not None:
        raise PromptError("lengths: only meaningful with a padded prompt array")
    if len(prompts) and isinstance(prompts[0], (int, np.integer)):
        prompts = [prompts]  # a single prompt given as one flat list
    return [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]


def validate(rows: Sequence[np.ndarray], vocab_size: int, max_prompt_len: int | None) -> None:
    if not rows:
        raise PromptError("prompts: got an empty batch")
    for b, r in enumerate(rows):
        if r.size == 0:
            raise PromptError(f"prompt {b} is empty: generation needs at least one token to condition on")
        bad = (r < 0) | (r >= vocab_size)
        if bad.any():
            raise PromptError(f"prompt {b}: token id {int(r[bad][0])} at index {int(np.argmax(bad))} is outside the "
                              f"vocabulary [0, {vocab_size})")
        if max_prompt_len is not None and r.size > max_prompt_len:
            raise PromptError(f"prompt {b} has {r.size} tokens but the cache holds at most {max_prompt_len} "
                              f"positions: shorten the prompt or raise max_len")


def pad_batch(rows: Sequence[np.ndarray], *, bucket: bool = True, pad_id: int = 0):
    """-> ids [Bb, Tb] int32 (right-padded), lens [Bb] int32 (0 for padding rows), live [Bb] bool."""
    B, T = len(rows), max(r.size for r in rows)
    Bb, Tb = (next_pow2(B), next_pow2(T, MIN_LEN_BUCKET)) if bucket else (B, T)
    ids = np.full((Bb, Tb), pad_id, np.int32)
    lens = np.zeros(Bb, np.int32)
    for b, r in enumerate(rows):
        ids[b, : r.size] = r
        lens[b] = r.size
    return ids, lens, np.arange(Bb) < B


def row_seeds(seed, n_rows: int, n_padded: int) -> np.ndarray:
    """An int seed gives row b the seed `seed + b` (distinct samples for repeated prompts); a list sets each row."""
    if np.ndim(seed) == 0:
        s = int(seed) + np.arange(n_rows)
    else:
        s = np.asarray(seed, np.int64)
        if s.shape != (n_rows,):
            raise PromptError(f"seed: expected an int or {n_rows} per-row seeds, got shape {s.shape}")
    return np.concatenate([s, np.zeros(n_padded - n_rows, np.int64)]).astype(np.uint32)
