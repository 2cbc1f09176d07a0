"""Structured output: `response_format` -> a per-step packed int32 bitmask of the tokens allowed next (llguidance).

    grammar = json_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})  # None for text
    guide = Guide(compiler, grammar)          # one per generated sequence
    mask = guide(generated_ids)                # int32 [ceil(V/32)]: bit t%32 of word t//32 set = token t allowed

The engine calls the guide from its thread with the sequence's generated tokens so far (it fills the mask on the host
while the device step runs and applies it in the jitted step). llguidance computes masks from the tokenizer.json
vocabulary in Rust in tens of microseconds; ids past the tokenizer's pieces (a padded embedding) are never allowed.
Once the grammar is complete only EOS is allowed, so a schema-bounded object ends by itself.

JSON is compiled compact (`whitespace_flexible: false`: no whitespace between tokens, "," and ":" separators, as the
OpenAI API returns it), so a model cannot pad an object with whitespace up to max_tokens.
"""
from __future__ import annotations

import functools
import json
from typing import Optional, Sequence

import numpy as np

# forced for every schema (after the schema's own "x-guidance" options)
_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class GrammarError(ValueError):
    """response_format cannot be compiled (bad schema, unsupported keyword): a 400 naming response_format."""


@functools.lru_cache(maxsize=256)
def _grammar_for(schema_json: str) -> str:
    import llguidance
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=_COMPACT)
    except ValueError as e:
        raise GrammarError(f"response_format: invalid JSON schema: {e}") from None


def json_grammar(response_format: Optional[dict]) -> Optional[str]:
    """The llguidance grammar for an OpenAI response_format (a dict), or None for free text."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: object = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("response_format.json_schema: expected an object {name, schema, strict} with 'schema' "
                               "a JSON schema object")
        schema = spec.get("schema", {})
    else:
        raise GrammarError(f"response_format.type={kind!r}: expected 'text', 'json_object' or 'json_schema'")
    return _grammar_for(json.dumps(schema, sort_keys=True))


class GuideCompiler:
    """Holds the llguidance tokenizer of one model (building it costs ~ms per thousand pieces, so once) and checks
    grammars against it."""

    def __init__(self, tokenizer, model_vocab: int):
        if tokenizer.vocab_size > model_vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size={model_vocab}")
        if not tokenizer.eos_ids:
            raise ValueError("structured output needs an EOS token to end a completed grammar; the model has none")
        self.vocab = model_vocab
        self.words = (model_vocab + 31) // 32
        self.ll_tokenizer = tokenizer.guidance_tokenizer(model_vocab)

    def check(self, grammar: str) -> None:
        import llguidance
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise GrammarError(f"response_format: the schema cannot be compiled: {messages[0] if messages else ''}")


class Guide:
    """One sequence's grammar state: a callable the engine asks for the next-token mask."""

    def __init__(self, compiler: GuideCompiler, grammar: str):
        import llguidance
        self.c = compiler
        self.matcher = llguidance.LLMatcher(compiler.ll_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"response_format: {self.matcher.get_error()}")
        self.consumed = 0
        # llguidance's mask covers its vocab (>= the model's): words past the model's are cut off
        self._buf = np.zeros((1, (compiler.ll_tokenizer.vocab_size + 31) // 32), np.int32)

    def __call__(self, generated_ids: Sequence[int]) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        new = list(generated_ids[self.consumed:])
        if len(generated_ids) < self.consumed:  # the engine recomputed the sequence after a preemption
            self.matcher.rollback(self.consumed - len(generated_ids))
            new = []
        self.consumed = len(generated_ids)
        for t in new:
            if not self.matcher.is_stopped():  # EOS after a completed grammar ends the sequence; nothing to consume
                self.matcher.consume_token(int(t))
        if self.matcher.is_error():
            # a token outside the mask reached us (it cannot when the engine applied the mask): end the sequence
            return self.eos_only()
        fill_next_token_bitmask(self.matcher, self._buf, 0)
        return self._buf[0, : self.c.words].copy()

    def eos_only(self) -> np.ndarray:
        out = np.zeros(self.c.words, np.int32)
        for e in self.c.ll_tokenizer.eos_tokens:
            if e < self.c.vocab:
                out[e // 32] |= np.int32(np.uint32(1 << (e % 32)).view(np.int32))
        return out

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()


def unpack(mask_W: np.ndarray, vocab: int) -> np.ndarray:
    """Packed int32 words -> bool [vocab] (bit t % 32 of word t // 32, little-endian as llguidance packs them)."""
    return np.unpackbits(np.ascontiguousarray(mask_W, np.int32).view(np.uint8), bitorder="little")[:vocab].astype(bool)


def pack(allowed_V: np.ndarray) -> np.ndarray:
    """bool [V] -> packed int32 words [ceil(V/32)] (the inverse of unpack)."""
    v = len(allowed_V)
    bits = np.zeros(((v + 31) // 32) * 32, np.uint8)
    bits[:v] = allowed_V
    return np.packbits(bits, bitorder="little").view(np.int32)


def combine(*masks) -> Optional[callable]:
    """A mask callable that allows the intersection of several (None entries = all allowed)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0]
    return lambda ids: functools.reduce(np.bitwise_and, (m(ids) for m in masks))
