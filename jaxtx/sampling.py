"""Token selection from logits: greedy, temperature, top-k, top-p, min-p, penalties, per-row seeds, log-probs.

Every function here is pure and jit-friendly: logits in, logits / tokens out, no Python control flow on traced values.
`Sampling` is a frozen (hashable) dataclass so it can be a static argument of the jitted decoding loops: the choice of
filters is baked into the compiled program, which is why greedy decoding pays nothing for the sampling machinery.

Core rather than infer: the static-cache decode loop (`jaxtx.decode`) samples with it, and both infer's generation
and train's end-of-run samples run that loop.

Order of operations (same as transformers' logits processors, so settings carry over):
    penalties -> temperature -> top-k -> top-p -> min-p -> sample
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

# Tokens outside the support get this logit: exp() of it is exactly 0 and it never produces NaN (unlike -inf - -inf).
NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. temperature 0 means greedy (argmax) and disables the filters."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off; else keep the k most likely tokens
    top_p: float = 1.0  # 1.0 = off; else keep the smallest set of most likely tokens with mass >= top_p
    min_p: float = 0.0  # 0 = off; else keep tokens with prob >= min_p * max prob
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + generated tokens; 1.0 = off
    frequency_penalty: float = 0.0  # OpenAI-style, subtracts penalty * count(generated); 0 = off
    presence_penalty: float = 0.0  # OpenAI-style, subtracts penalty once a token was generated; 0 = off

    def __post_init__(self):
        # a NaN fails every range check below without a word about NaN, and an infinite penalty or temperature turns
        # the logits into NaN; top_k must be an integer (it sizes lax.top_k)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = numbers.Integral if f.name == "top_k" else numbers.Real
            if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v):
                raise ValueError(f"Sampling.{f.name}={v!r}: must be a finite "
                                 f"{'integer' if f.name == 'top_k' else 'number'}")
        checks = [("temperature", self.temperature >= 0, ">= 0"), ("top_k", self.top_k >= 0, ">= 0"),
                  ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"), ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"Sampling.{name}={getattr(self, name)!r}: must be {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


GREEDY = Sampling()


# ------------------------------------------------------------------------------------------------ penalties
def apply_penalties(logits_BV, s: Sampling, *, seen_BV=None, counts_BV=None):
    """seen_BV bool: token occurs in prompt or output (repetition penalty, as in HF); counts_BV int: occurrences in the
    generated output only (frequency / presence, as in the OpenAI API)."""
    x = logits_BV.astype(jnp.float32)
    if s.repetition_penalty != 1.0:
        # Dividing a positive logit / multiplying a negative one both make the token less likely.
        pen = jnp.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty)
        x = jnp.where(seen_BV, pen, x)
    if s.frequency_penalty != 0.0 or s.presence_penalty != 0.0:
        c = counts_BV.astype(jnp.float32)
        x = x - s.frequency_penalty * c - s.presence_penalty * (c > 0)
    return x


# ------------------------------------------------------------------------------------------------ filters
def top_k_filter(logits_BV, k: int):
    """Keep the k largest logits per row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV >= kth, logits_BV, NEG)


def top_p_filter(logits_BV, p: float):
    """Keep the smallest set of most likely tokens whose probability mass reaches p (the top token always stays)."""
    if p >= 1.0:
        return logits_BV
    sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_BV, n_keep - 1, axis=-1)
    return jnp.where(logits_BV >= threshold, logits_BV, NEG)


def min_p_filter(logits_BV, p: float):
    """Keep tokens whose probability is at least p times the top token's: logit >= max logit + log p."""
    if p <= 0.0:
        return logits_BV
    top = jnp.max(logits_BV, axis=-1, keepdims=True)
    return jnp.where(logits_BV >= top + jnp.log(p), logits_BV, NEG)


def process_logits(logits_BV, s: Sampling, *, seen_BV=None, counts_BV=None):
    """Penalties, temperature and the truncation filters: the logits whose softmax is the sampling distribution.
    For greedy settings only the penalties apply (argmax of the result is the greedy token)."""
    x = apply_penalties(logits_BV, s, seen_BV=seen_BV, counts_BV=counts_BV)
    if s.greedy:
        return x
    x = x / s.temperature
    x = top_k_filter(x, s.top_k)
    x = top_p_filter(x, s.top_p)
    return min_p_filter(x, s.min_p)


def probs(logits_BV, s: Sampling, **penalty_state):
    """The distribution the sampler draws from, [B, V] float32 (one-hot at the argmax for greedy)."""
    x = process_logits(logits_BV, s, **penalty_state)
    if s.greedy:
        return jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(x, axis=-1)


# ------------------------------------------------------------------------------------------------ drawing
def row_keys(seeds_B, step):
    """One PRNG key per row from its own seed and the decoding step: a row's random stream depends only on its seed
    and how many tokens it has produced, never on which other rows share the batch."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds_B)


def sample(logits_BV, s: Sampling, keys_B=None, **penalty_state):
    """Next token per row, [B] int32. keys_B: a typed key per row (see row_keys); unused for greedy."""
    x = process_logits(logits_BV, s, **penalty_state)
    if s.greedy:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys_B, x).astype(jnp.int32)


def token_logprobs(logits_BV, tokens_B):
    """log p(token) under the model's own distribution (raw logits: no temperature, penalties or truncation), [B]."""
    logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens_B[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------------------------------ penalty state
def init_penalty_state(prompt_ids_BT, prompt_mask_BT, vocab_size: int, s: Sampling):
    """(seen_BV, counts_BV) for the decode loop; (None, None) when no penalty is on so greedy carries nothing."""
    if not s.penalized:
        return None, None
    B = prompt_ids_BT.shape[0]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], prompt_ids_BT.shape)
    seen = jnp.zeros((B, vocab_size), bool).at[rows, prompt_ids_BT].max(prompt_mask_BT.astype(bool))
    return seen, jnp.zeros((B, vocab_size), jnp.int32)


def update_penalty_state(seen_BV, counts_BV, tokens_B, live_B):
    """Record the tokens just produced by live rows."""
    if seen_BV is None:
        return None, None
    rows = jnp.arange(tokens_B.shape[0])
    return (seen_BV.at[rows, tokens_B].max(live_B),
            counts_BV.at[rows, tokens_B].add(live_B.astype(jnp.int32)))
