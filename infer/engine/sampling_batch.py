"""Per-request sampling in fixed [R] arrays (R = max_seqs), so one compiled step serves every mix of settings.

The order of operations and every formula are those of `jaxtx.sampling` (penalties -> temperature -> top-k ->
top-p -> min-p -> sample), written with per-row parameters; a row with the static path's settings gets bitwise the
same processed logits, the same PRNG key (fold_in(key(seed), tokens generated so far)) and therefore the same token.
A request's samples depend only on its prompt, its settings and its seed: the key never involves the batch row.
The allowed-tokens bitmask (structured output) is applied after the penalties; masked tokens get NEG, like filtered
ones.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx.sampling import NEG, Sampling


class RowParams(NamedTuple):
    temperature: jax.Array  # [R] f32, 0 = greedy
    top_k: jax.Array  # [R] i32, 0 = off
    top_p: jax.Array  # [R] f32, 1 = off
    min_p: jax.Array  # [R] f32, 0 = off
    repetition: jax.Array  # [R] f32, 1 = off
    frequency: jax.Array  # [R] f32
    presence: jax.Array  # [R] f32
    seed: jax.Array  # [R] uint32
    step: jax.Array  # [R] i32, tokens the request has generated so far (the key's counter)

    @staticmethod
    def host(R: int) -> "RowParams":
        """Neutral numpy arrays (greedy, no filters) for R rows; fill rows with `set_row`."""
        return RowParams(np.zeros(R, np.float32), np.zeros(R, np.int32), np.ones(R, np.float32),
                         np.zeros(R, np.float32), np.ones(R, np.float32), np.zeros(R, np.float32),
                         np.zeros(R, np.float32), np.zeros(R, np.uint32), np.zeros(R, np.int32))


def set_row(p: RowParams, r: int, s: Sampling, seed: int, step: int) -> None:
    p.temperature[r], p.top_k[r], p.top_p[r], p.min_p[r] = s.temperature, s.top_k, s.top_p, s.min_p
    p.repetition[r], p.frequency[r], p.presence[r] = s.repetition_penalty, s.frequency_penalty, s.presence_penalty
    p.seed[r], p.step[r] = np.uint32(seed), step


def words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def unpack_bitmask(allowed_RW, V: int):
    """[R, ceil(V/32)] int32 (bit v % 32 of word v // 32 = token v allowed) -> [R, V] bool."""
    v = jnp.arange(V)
    w = jnp.take(allowed_RW, v // 32, axis=1)
    return (jax.lax.shift_right_logical(w, (v % 32).astype(jnp.int32)[None, :]) & 1).astype(bool)


def _penalties(x, p: RowParams, seen_RV, counts_RV):
    rp = p.repetition[:, None]
    x = jnp.where(seen_RV, jnp.where(x > 0, x / rp, x * rp), x)  # rp == 1: x / 1 and x * 1 are exact
    c = counts_RV.astype(jnp.float32)
    return x - p.frequency[:, None] * c - p.presence[:, None] * (c > 0)  # - 0 * c - 0 is exact too


def _filters(x, p: RowParams):
    """Temperature, top-k, top-p, min-p per row (rows with temperature 0 come out unused). One sort serves top-k and
    top-p: filtering keeps a prefix of the descending order, so the sorted filtered row is the sorted row with its
    tail set to NEG, bitwise what sorting the filtered row again would give."""
    V = x.shape[-1]
    x = x / jnp.where(p.temperature > 0, p.temperature, 1.0)[:, None]

    def truncate(x):
        sorted_RV = jnp.sort(x, axis=-1)[..., ::-1]
        k = p.top_k[:, None]
        kth = jnp.take_along_axis(sorted_RV, jnp.clip(k - 1, 0, V - 1), axis=-1)
        use_k = (k > 0) & (k < V)
        x = jnp.where(use_k & (x < kth), NEG, x)
        sorted_RV = jnp.where(use_k & (sorted_RV < kth), NEG, sorted_RV)
        probs = jax.nn.softmax(sorted_RV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(mass_before < p.top_p[:, None], axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_RV, n_keep - 1, axis=-1)
        return jnp.where((p.top_p[:, None] < 1.0) & (x < threshold), NEG, x)

    # the sort is the costly part (R x V): skip it when no row truncates (greedy and plain-temperature batches)
    x = jax.lax.cond(jnp.any((p.temperature > 0) & ((p.top_k > 0) | (p.top_p < 1.0))), truncate, lambda x: x, x)
    top = jnp.max(x, axis=-1, keepdims=True)
    min_p = p.min_p[:, None]
    return jnp.where((min_p > 0) & (x < top + jnp.log(jnp.where(min_p > 0, min_p, 1.0))), NEG, x)


def sample_rows(logits_RV, p: RowParams, seen_RV, counts_RV, allowed_RW, *, n_top: int):
    """-> (tokens [R] i32, logprob of the token [R] f32, top-N ids [R, n_top] i32, top-N logprobs [R, n_top] f32).
    Log-probs are under the model's raw distribution (as `generate(return_logprobs=True)`)."""
    raw = logits_RV.astype(jnp.float32)
    V = raw.shape[-1]
    x = _penalties(raw, p, seen_RV, counts_RV)
    x = jnp.where(unpack_bitmask(allowed_RW, V), x, NEG)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def draw(x):
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(p.seed, p.step)
        return jax.vmap(jax.random.categorical)(keys, _filters(x, p)).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(p.temperature > 0), draw, lambda x: greedy_tok, x)
    tok = jnp.where(p.temperature > 0, sampled, greedy_tok)
    logp = jax.nn.log_softmax(raw, axis=-1)
    tok_lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    if n_top:
        top_lp, top_ids = jax.lax.top_k(logp, n_top)
    else:
        top_lp, top_ids = jnp.zeros((raw.shape[0], 0), jnp.float32), jnp.zeros((raw.shape[0], 0), jnp.int32)
    return tok, tok_lp, top_ids.astype(jnp.int32), top_lp


def update_penalty_state(seen_RV, counts_RV, slots_R, tok_R, live_R):
    """Record the sampled tokens in the rows `slots_R` of the penalty state (rows not live write nowhere)."""
    rows = jnp.where(live_R, slots_R, seen_RV.shape[0])  # out of range: dropped
    return (seen_RV.at[rows, tok_R].set(True, mode="drop"), counts_RV.at[rows, tok_R].add(1, mode="drop"))
