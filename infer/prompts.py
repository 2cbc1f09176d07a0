"""Host-side prompt preparation: validation with clear errors and per-row seeds.

Every public decoding entry point (generate, stream, beam_search, speculative_generate, embed) goes through this
module before anything reaches JAX, so a bad argument is a `PromptError` (a ValueError) that names the argument, the
value and what was expected, never a tracer error from deep inside a jitted loop:

    check_options(cfg, max_new_tokens=..., eos_id=..., stop=..., max_len=..., num_beams=..., ...)   scalar options
    rows = as_rows(prompts, lengths)     token-id lists or a padded [B, T] int array -> 1-D int64 rows
    validate(rows, vocab_size, max_prompt_len)                                         ids in range, fits the cache
    seeds = row_seeds(seed, n_rows, n_padded)

Padding to the shape buckets (`pad_batch`) belongs to the decode loop in core (`jaxtx.decode`), which train's
end-of-run samples share.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SEED_LIMIT = 1 << 32  # row seeds are uint32 on device (jax.random.key); larger or negative ones would wrap silently


class PromptError(ValueError):
    """A prompt or decoding option cannot be used (empty, too long for the cache, ids outside the vocabulary, ...)."""


# ------------------------------------------------------------------------------------------------ scalar options
def _is_int(x) -> bool:
    # bool is an int subclass; True as a token id or a count is always a mistake
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _show(x) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def check_int(name: str, value, minimum: int) -> int:
    """An integer argument >= minimum (max_new_tokens, num_beams, k, max_len), as a Python int."""
    if not _is_int(value):
        raise PromptError(f"{name}={_show(value)}: expected an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise PromptError(f"{name}={value}: expected an integer >= {minimum}")
    return int(value)


def check_token_id(name: str, value, vocab_size: int) -> int:
    """One token id in [0, vocab_size)."""
    if not _is_int(value):
        raise PromptError(f"{name}={_show(value)}: expected an integer token id in [0, {vocab_size}), got "
                          f"{type(value).__name__}")
    if not 0 <= value < vocab_size:
        raise PromptError(f"{name}={value}: token id outside the vocabulary [0, {vocab_size}) of the model")
    return int(value)


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PromptError(f"{name}={_show(value)}: expected a finite number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise PromptError(f"{name}={value}: expected a finite number")
    return float(value)


def _token_ids(name: str, value, vocab_size: int) -> list:
    """An int, or a list/array of them (several EOS ids), each in the vocabulary."""
    if isinstance(value, (str, bytes)):
        raise PromptError(f"{name}={_show(value)}: expected token ids (ints), got a string; encode it with the "
                          f"tokenizer first")
    if np.ndim(value) == 0 and not isinstance(value, (list, tuple)):
        return [check_token_id(name, value.item() if isinstance(value, np.ndarray) else value, vocab_size)]
    items = np.asarray(value).tolist() if hasattr(value, "shape") else list(value)
    if not items:
        raise PromptError(f"{name}=[]: expected a token id or a non-empty list of them (or None)")
    return [check_token_id(f"{name}[{i}]", t, vocab_size) for i, t in enumerate(items)]


def check_options(cfg, *, max_new_tokens, eos_id=None, stop=None, max_len=None, num_beams=None, length_penalty=None,
                  k=None) -> None:
    """The scalar options of a decoding call. cfg: the model's ModelConfig (for vocab_size). `stop` is a list of
    stop token ids and/or token-id sequences; stop strings belong to a tokenizer, so they are refused here."""
    V = cfg.vocab_size
    check_int("max_new_tokens", max_new_tokens, 1)
    if max_len is not None:
        check_int("max_len", max_len, 1)
    if num_beams is not None:
        check_int("num_beams", num_beams, 1)
    if k is not None:
        check_int("k", k, 1)
    if length_penalty is not None:
        check_finite("length_penalty", length_penalty)
    if eos_id is not None:
        _token_ids("eos_id", eos_id, V)
    if stop is None:
        return
    if isinstance(stop, (str, bytes)) or (np.ndim(stop) == 0 and not isinstance(stop, (list, tuple))):
        raise PromptError(f"stop={_show(stop)}: expected a list of stop token ids / token-id sequences")
    for i, s in enumerate(stop):
        if isinstance(s, str):
            raise PromptError(f"stop[{i}]={_show(s)}: stop strings need a tokenizer; pass token ids / token-id "
                              f"sequences here (the CLI turns stop strings into both)")
        if np.ndim(s) == 0 and not isinstance(s, (list, tuple)):
            check_token_id(f"stop[{i}]", s, V)
        else:
            seq = np.asarray(s).tolist() if hasattr(s, "shape") else list(s)
            for j, t in enumerate(seq):
                check_token_id(f"stop[{i}][{j}]", t, V)


# ------------------------------------------------------------------------------------------------ prompts
_PROMPTS_HELP = "expected token-id lists (list[list[int]]), one list[int], or a padded [B, T] int array with lengths"


def _row(b: int, r) -> np.ndarray:
    """One prompt (list / tuple / 1-D int array) -> 1-D int64 array, refusing floats, strings and nesting."""
    where = f"prompts[{b}]"
    if isinstance(r, (str, bytes)):
        raise PromptError(f"{where}={_show(r)}: got a string; {_PROMPTS_HELP} (encode text with a tokenizer first)")
    if hasattr(r, "shape"):  # numpy / jax array
        a = np.asarray(r)
        if a.ndim != 1:
            raise PromptError(f"{where}: expected a 1-D token-id array, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise PromptError(f"{where}: expected integer token ids, got a {a.dtype} array")
        return a.astype(np.int64)
    if _is_int(r):
        raise PromptError(f"{where}={r}: a token id where a prompt was expected; {_PROMPTS_HELP}")
    if not isinstance(r, (list, tuple)):
        raise PromptError(f"{where}: got {type(r).__name__}; {_PROMPTS_HELP}")
    for t, x in enumerate(r):
        if not _is_int(x):
            what = "a nested list (one level too deep)" if isinstance(x, (list, tuple)) or hasattr(x, "shape") \
                else f"{type(x).__name__} {_show(x)}"
            raise PromptError(f"prompts[{b}][{t}]: expected an integer token id, got {what}")
    return np.asarray(r, dtype=np.int64).reshape(-1)


def _lengths(lengths, B: int, T: int) -> list[int]:
    if isinstance(lengths, (str, bytes)) or np.ndim(lengths) != 1:
        raise PromptError(f"lengths={_show(lengths)}: expected one length per row, shape ({B},)")
    items = np.asarray(lengths).tolist() if hasattr(lengths, "shape") else list(lengths)
    if len(items) != B:
        raise PromptError(f"lengths: expected shape ({B},) for prompts of shape ({B}, {T}), got {len(items)} lengths")
    for b, n in enumerate(items):
        if not _is_int(n):
            raise PromptError(f"lengths[{b}]={_show(n)}: expected an integer in [1, {T}], got {type(n).__name__}")
        if not 1 <= n <= T:
            raise PromptError(f"lengths[{b}]={n}: expected 1 <= length <= {T} (the padded row width); an empty "
                              f"prompt gives the model nothing to condition on")
    return [int(n) for n in items]


def as_rows(prompts, lengths=None) -> list[np.ndarray]:
    """Token-id lists, one flat list, or a padded [B, T] int array with `lengths [B]`, as a list of 1-D int64 rows.

    Refused (PromptError naming the argument and value): strings, float ids, ragged or too deeply nested lists,
    lengths that are not integers in [1, T], lengths given with lists, an empty batch."""
    if isinstance(prompts, (str, bytes)):
        raise PromptError(f"prompts={_show(prompts)}: got a string; {_PROMPTS_HELP} (encode text with a tokenizer "
                          f"first, e.g. tok.encode(text))")
    if hasattr(prompts, "shape"):  # numpy / jax array
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise PromptError(f"prompts: expected token-id lists or a [B, T] array, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise PromptError(f"prompts: expected integer token ids, got a {arr.dtype} array of shape {arr.shape}")
        if arr.shape[0] == 0:
            raise PromptError("prompts: got an empty batch (shape (0, T))")
        lens = [arr.shape[1]] * arr.shape[0] if lengths is None else _lengths(lengths, *arr.shape)
        return [arr[b, : lens[b]].astype(np.int64) for b in range(arr.shape[0])]
    if lengths is not None:
        raise PromptError("lengths: only meaningful with a padded [B, T] prompt array (token-id lists carry their "
                          "own lengths)")
    if not isinstance(prompts, (list, tuple)):
        raise PromptError(f"prompts: got {type(prompts).__name__}; {_PROMPTS_HELP}")
    if not prompts:
        raise PromptError("prompts: got an empty batch")
    nested = [isinstance(x, (list, tuple, str, bytes)) or hasattr(x, "shape") for x in prompts]
    if not any(nested):  # a single prompt given as one flat list
        for t, x in enumerate(prompts):
            if not _is_int(x):
                raise PromptError(f"prompts[{t}]={_show(x)}: expected an integer token id, got {type(x).__name__}")
        return [np.asarray(prompts, dtype=np.int64)]
    if not all(nested):
        b = nested.index(False)
        raise PromptError(f"prompts[{b}]={_show(prompts[b])}: a token id beside prompt lists (mixed nesting); "
                          f"{_PROMPTS_HELP}")
    return [_row(b, r) for b, r in enumerate(prompts)]


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


def row_seeds(seed, n_rows: int, n_padded: int) -> np.ndarray:
    """An int seed gives row b the seed `seed + b` (distinct samples for repeated prompts); a list sets each row.
    Seeds must lie in [0, 2**32): they become uint32 on device, and a wrapped seed would silently repeat another."""
    if np.ndim(seed) == 0:
        if not _is_int(seed):
            raise PromptError(f"seed={_show(seed)}: expected an integer in [0, 2**32) or one per row")
        s = int(seed) + np.arange(n_rows, dtype=np.int64)
    else:
        items = np.asarray(seed).tolist() if hasattr(seed, "shape") else list(seed)
        if len(items) != n_rows or not all(_is_int(x) for x in items):
            raise PromptError(f"seed={_show(seed)}: expected an int or {n_rows} integer per-row seeds")
        s = np.asarray(items, np.int64)
    if s.size and (s.min() < 0 or s.max() >= SEED_LIMIT):
        bad = int(s[(s < 0) | (s >= SEED_LIMIT)][0])
        raise PromptError(f"seed={_show(seed)}: row seed {bad} is outside [0, 2**32)")
    return np.concatenate([s, np.zeros(n_padded - n_rows, np.int64)]).astype(np.uint32)
