"""EngineConfig: the static sizes of a serving engine (everything that fixes a compiled shape lives here)."""
from __future__ import annotations

import dataclasses
from typing import Optional


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_seqs: requests running at once (the fixed row count R of every step). page_size: tokens per KV page.
    num_pages: pages in the pool (P). max_tokens_per_step: the token budget of one step (the largest token bucket).
    max_model_len: prompt + generated tokens of one request (default: the pool, or the model's max_seq_len for learned
    positions). min_token_bucket: the smallest flat-token bucket; the buckets are its powers of two up to
    max_tokens_per_step. decode_steps: decode steps run in one jitted loop when nothing is waiting (1 = off).
    prefix_caching: reuse full pages by chained hash. max_logprobs: the top-N alternatives computed every step
    (0 = none; a request may ask for up to this many). prompt_logprobs: also compile the all-token-logits variant of
    every bucket, so requests may ask for prompt log-probs (doubles the warm-up)."""

    max_seqs: int = 16
    page_size: int = 16
    num_pages: int = 256
    max_tokens_per_step: int = 256
    max_model_len: Optional[int] = None
    quantize_kv: bool = False
    decode_steps: int = 8
    prefix_caching: bool = True
    min_token_bucket: int = 16
    max_logprobs: int = 20
    prompt_logprobs: bool = False

    def __post_init__(self):
        pos = ["max_seqs", "page_size", "num_pages", "max_tokens_per_step", "decode_steps", "min_token_bucket"]
        for name in pos:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineConfig.{name}={v!r}: must be an int >= 1")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len={self.max_model_len!r}: must be an int >= 2 or None")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs={self.max_logprobs!r}: must be an int >= 0")
        if self.max_tokens_per_step < self.max_seqs:
            raise ValueError(f"EngineConfig.max_tokens_per_step={self.max_tokens_per_step} must be >= max_seqs="
                             f"{self.max_seqs}: every running request needs room for its decode token each step")
        if self.min_token_bucket & (self.min_token_bucket - 1):
            raise ValueError(f"EngineConfig.min_token_bucket={self.min_token_bucket}: must be a power of two")

    def token_buckets(self) -> tuple:
        """The flat-token sizes the step is compiled for: powers of two from min_token_bucket, the last one covering
        max_tokens_per_step."""
        out, b = [], min(self.min_token_bucket, next_pow2(self.max_tokens_per_step))
        while b < self.max_tokens_per_step:
            out.append(b)
            b *= 2
        return tuple(out + [next_pow2(self.max_tokens_per_step)])

    def bucket(self, n_tokens: int) -> int:
        for b in self.token_buckets():
            if n_tokens <= b:
                return b
        raise ValueError(f"{n_tokens} tokens exceed max_tokens_per_step={self.max_tokens_per_step}")

    def decode_buckets(self) -> tuple:
        """Token sizes of the multi-step decode loop (one token per running request)."""
        return tuple(b for b in self.token_buckets() if b < self.max_seqs) + (self.bucket(self.max_seqs),)
