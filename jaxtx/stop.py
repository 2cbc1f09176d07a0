"""Stop conditions: stop tokens and stop sequences on device, stop strings on the host.

On device a stop condition is a token-id sequence (a single stop token is a sequence of length 1). They are packed
into one padded int32 array so the decode loop can check "does this row's output end with any stop sequence" with a
few vectorized compares per step.

Stop *strings* cannot be decided on token ids alone: the same text can be tokenized many ways ("\\n\\n" may be one
token or two). The loop stops on the tokenizer's encoding of each string (the common case) and the host then cuts the
decoded text exactly at the first occurrence of any stop string (`truncate_text`), which also catches the other cases
once the loop has stopped for another reason.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np


def pack_stop_sequences(stop: Iterable[int | Sequence[int]] | None):
    """Stop tokens / token sequences -> (seqs [N, M] int32 right-aligned with -1 padding, lens [N]); None if empty.

    Right alignment lets the loop compare each sequence against the last M generated tokens directly.
    """
    seqs = [[int(s)] if isinstance(s, (int, np.integer)) else [int(t) for t in s] for s in (stop or [])]
    seqs = [s for s in seqs if s]
    if not seqs:
        return None
    M = max(len(s) for s in seqs)
    arr = np.full((len(seqs), M), -1, np.int32)
    for i, s in enumerate(seqs):
        arr[i, M - len(s):] = s
    return jnp.asarray(arr), jnp.asarray([len(s) for s in seqs], jnp.int32)


def ends_with_stop(out_BN, n_B, stop_packed):
    """out_BN: generated tokens so far (int32, position i valid when i < n_B). True where a row's output ends with one
    of the stop sequences, [B] bool."""
    if stop_packed is None:
        return jnp.zeros(out_BN.shape[0], bool)
    seqs_NM, lens_N = stop_packed
    M = seqs_NM.shape[1]
    idx_BM = n_B[:, None] - M + jnp.arange(M)[None, :]  # the last M output positions of each row
    tail_BM = jnp.take_along_axis(out_BN, jnp.clip(idx_BM, 0, out_BN.shape[1] - 1), axis=1)
    tail_BM = jnp.where(idx_BM >= 0, tail_BM, -2)  # before the output start: matches nothing (padding is -1)
    match_BNM = (tail_BM[:, None, :] == seqs_NM[None]) | (seqs_NM[None] < 0)
    return jnp.any(jnp.all(match_BNM, axis=-1) & (n_B[:, None] >= lens_N[None]), axis=-1)


def truncate_text(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Cut text before the earliest stop string. Returns (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def truncate_tokens(tokens: Sequence[int], eos_ids: Iterable[int]) -> list[int]:
    """Tokens up to (not including) the first EOS / stop token."""
    eos = set(int(e) for e in eos_ids)
    out = []
    for t in tokens:
        if int(t) in eos:
            break
        out.append(int(t))
    return out
