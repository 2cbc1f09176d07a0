"""Turn token lists into fixed-length rows: the only shapes the jitted step ever sees.

All functions are pure numpy and deterministic. Row formats (every array int32, leading axis N rows):
- pack_documents:  tokens [N, T], segment_ids [N, T] (1, 2, ... per document piece in a row; 0 = padding).
  Documents (each ending in EOS) are laid end to end and cut every T tokens; attention and loss never cross documents
  because the model masks by segment id and the causal loss only counts targets in the same segment.
- chunk_documents: one document piece per row (BERT/T5 style, the model's attention_mask handles only padding).
- prompt_response_rows: one example per row with loss_mask [N, T] = 1 on response tokens (the loss counts them only).
- span_corrupt: T5 span corruption of one row (used on the fly with a per-row RNG).
"""
from __future__ import annotations

import numpy as np

from jaxtx.config import ConfigError
from jaxtx.train.tokenizer import EOS, PAD


def pack_documents(docs: list[list[int]], T: int) -> dict[str, np.ndarray]:
    """Concatenate docs (+EOS each) and cut into rows of T with per-row segment numbering."""
    lens = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        raise ConfigError("data: the corpus is empty after tokenization")
    stream = np.empty(total, np.int32)
    doc_of = np.repeat(np.arange(len(docs)), lens)
    pos = 0
    for d in docs:
        stream[pos:pos + len(d)] = d
        stream[pos + len(d)] = EOS
        pos += len(d) + 1
    n = -(-total // T)
    tokens = np.full(n * T, PAD, np.int32)
    tokens[:total] = stream
    doc = np.full(n * T, -1, np.int64)
    doc[:total] = doc_of
    tokens, doc = tokens.reshape(n, T), doc.reshape(n, T)
    # segment id = 1 + number of document changes so far in the row; padding = 0
    change = np.concatenate([np.zeros((n, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    seg = (1 + np.cumsum(change, axis=1)).astype(np.int32)
    seg[doc < 0] = 0
    return {"tokens": tokens, "segment_ids": seg}


def chunk_documents(docs: list[list[int]], T: int, *, min_len: int = 8) -> dict[str, np.ndarray]:
    """Each document cut into pieces of at most T tokens, one piece per row, right-padded with PAD (segment 0)."""
    pieces = [d[i:i + T] for d in docs for i in range(0, len(d), T)]
    pieces = [p for p in pieces if len(p) >= min_len]
    if not pieces:
        raise ConfigError(f"data: no document has at least {min_len} tokens")
    tokens = np.full((len(pieces), T), PAD, np.int32)
    seg = np.zeros((len(pieces), T), np.int32)
    for i, p in enumerate(pieces):
        tokens[i, :len(p)] = p
        seg[i, :len(p)] = 1
    return {"tokens": tokens, "segment_ids": seg}


def prompt_response_rows(pairs: list[tuple[list[int], list[int]]], T: int) -> dict[str, np.ndarray]:
    """prompt + response + EOS per row; loss_mask marks the response tokens (and EOS), which are the targets.

    Rows longer than T are cut at T (the cut keeps the prompt, so some response tokens are lost; counted by callers).
    """
    n = len(pairs)
    tokens = np.full((n, T), PAD, np.int32)
    seg = np.zeros((n, T), np.int32)
    mask = np.zeros((n, T), np.int32)
    for i, (p, r) in enumerate(pairs):
        row = (list(p) + list(r) + [EOS])[:T]
        tokens[i, :len(row)] = row
        seg[i, :len(row)] = 1
        mask[i, len(p):len(row)] = 1
    return {"tokens": tokens, "segment_ids": seg, "loss_mask": mask}


# ------------------------------------------------------------------------------------------------ T5 span corruption
def span_lengths(n: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, number of noise spans) for a row of n tokens, as in T5's random_spans_noise_mask."""
    num_noise = int(np.clip(round(n * noise_density), 1, n - 1))
    num_spans = max(1, int(round(num_noise / mean_span)))
    return num_noise, num_spans


def span_raw_length(input_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """Largest raw length whose corrupted encoder input (+EOS) fits input_len; returns (raw_len, target_len)."""
    n = input_len
    while True:
        noise, spans = span_lengths(n + 1, noise_density, mean_span)
        if (n + 1) - noise + spans + 1 > input_len:
            break
        n += 1
    noise, spans = span_lengths(n, noise_density, mean_span)
    return n, noise + spans + 1


def _random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Split `total` items into `parts` non-empty segments at random; returns segment lengths."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corrupt(tokens: np.ndarray, length: int, sentinels: np.ndarray, noise_density: float, mean_span: float,
                 rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """T5 span corruption of tokens[:length]: alternating kept/noise spans; each noise span is replaced in the input by
    one sentinel, and the target lists sentinel + span for every span, then EOS."""
    toks = [int(t) for t in tokens[:length]]
    if length < 2:
        return toks + [EOS], [EOS]
    num_noise, num_spans = span_lengths(length, noise_density, mean_span)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise_lens = _random_segmentation(num_noise, num_spans, rng)
    keep_lens = _random_segmentation(length - num_noise, num_spans, rng)
    inputs, targets, pos = [], [], 0
    for i in range(num_spans):  # keep span first, then noise span (as T5 does)
        inputs += toks[pos:pos + keep_lens[i]]
        pos += keep_lens[i]
        s = int(sentinels[i % len(sentinels)])
        inputs.append(s)
        targets += [s] + toks[pos:pos + noise_lens[i]]
        pos += noise_lens[i]
    return inputs + [EOS], targets + [EOS]
