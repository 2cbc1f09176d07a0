"""Batched generation: the public decoding API over core's static-cache decode loop (`jaxtx.decode`).

    out = generate(model, params, [[1, 5, 9], [1, 7]], max_new_tokens=32, sampling=Sampling(temperature=0.8))
    out.tokens        # new token ids per prompt (stop tokens / stop sequences excluded)
    out.finish_reasons  # "stop" | "length"

This module is the host side: it validates what a user passes (`jaxtx.infer.prompts`: a bad argument is a clear
`PromptError`, never a tracer error), then `generate` runs `jaxtx.decode`'s one compiled `lax.while_loop` and `stream`
calls the same `decode_step` jitted with the state donated, yielding tokens as they are produced. The loop lives in
core because train's end-of-run samples run it too (their tokens are those of `jaxtx generate` on the run dir).

Decode is fast by default: the jitted programs run a scanned model with its layers unrolled
(`jaxtx.decode.decoding_layout`), because a scanned stack copies every layer's weights out of the stack on every step
(see `for_decoding`). The unstacked weights are a temporary of the call, not a second copy kept alive.

Beam search and speculative decoding drive the same pieces: the device side from `jaxtx.decode` (`step_fn`, `encode`,
`prefill` / `prefill_cache`, `decode_step`, `decoding_layout`, `compiled`: the one jit cache keyed by model, also
reachable here as `generation.compiled` for the serving engine), the host side from here (`prepare`, `stop_arg`,
`finish`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Optional

import numpy as np

from jaxtx import decode
from jaxtx import sampling as sampling_lib
from jaxtx import stop as stop_lib
from jaxtx.decode import compiled  # the serving engine jits through generation.compiled
from jaxtx.infer import prompts as prompt_lib

__all__ = ["Generation", "Prepared", "checked_rows", "compiled", "finish", "for_decoding", "generate", "prepare",
           "stop_arg", "stream"]


@dataclasses.dataclass
class Generation:
    tokens: list  # list[list[int]]: new tokens per prompt, stop tokens / stop sequences excluded
    finish_reasons: list  # list[str]: "stop" (EOS / stop sequence) or "length" (max_new_tokens or cache full)
    logprobs: Optional[list] = None  # list[list[float]]: log p(token) under the model (raw logits), if requested


def for_decoding(model, params):
    """(model, params) laid out for fast decoding outside jaxtx's own decode loops: scanned layers unrolled (the KV
    cache then follows: one buffer per layer). `generate`, `stream`, `beam_search` and `speculative_generate` do this
    themselves (see `jaxtx.decode.decoding_layout`); this host-side form is for a caller that drives the model step
    by step.

    In a scanned stack XLA's while loop dynamic-slices each layer's weights out of the stacked params before its
    matmuls, a copy of every weight per step on top of the read that decode is bound by (`jaxtx bench decode --scan`,
    110M model, CPU: unrolled 1.5-1.9x faster; H100: 1.1x at batch 1, 1.7x at batch 8). Same math, same tokens; costs
    one copy of the params.
    """
    if model.cfg.kind != "decoder":
        return model, params
    return decode.decoding_layout(model, params)


class Prepared(NamedTuple):
    """Host-side inputs of one decoding call (numpy arrays, padded to the shape buckets)."""

    ids: np.ndarray  # [B, T] int32 decoder prompt (T5: [B, 1] start tokens)
    lens: np.ndarray  # [B] int32
    live: np.ndarray  # [B] bool, False for bucket padding rows
    seeds: np.ndarray  # [B] uint32
    enc_ids: Optional[np.ndarray]  # [B, S] T5 encoder input, else None
    enc_mask: Optional[np.ndarray]  # [B, S] int32
    n: int  # real prompts
    max_len: int  # cache length


def checked_rows(model, prompts, lengths, max_new_tokens, max_len) -> list:
    """The prompts as 1-D int64 rows, each id in the vocabulary and each (decoder) prompt fitting the cache."""
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    rows = prompt_lib.as_rows(prompts, lengths)
    cap = min(x for x in (max_len, decode.position_limit(cfg), 1 << 62) if x is not None)
    prompt_lib.validate(rows, cfg.vocab_size, None if cfg.kind == "encoder_decoder" else cap)
    return rows


def prepare(model, prompts, lengths, max_new_tokens, max_len, seed, bucket) -> Prepared:
    """Host side: validate, pad to the bucket, pick the cache length."""
    rows = checked_rows(model, prompts, lengths, max_new_tokens, max_len)
    d = decode.layout_batch(model.cfg, rows, max_new_tokens, max_len, bucket)
    seeds = prompt_lib.row_seeds(seed, len(rows), d.ids.shape[0])
    return Prepared(ids=d.ids, lens=d.lens, live=d.live, seeds=seeds, enc_ids=d.enc_ids, enc_mask=d.enc_mask,
                    n=len(rows), max_len=d.max_len)


def stop_arg(stop, eos_id):
    """(stop items as given + eos ids, their packed device form for `jaxtx.stop.ends_with_stop`)."""
    items = list(stop or [])
    if eos_id is not None:
        items += list(np.atleast_1d(eos_id).tolist())
    if any(isinstance(s, str) for s in items):
        raise TypeError("stop: strings need a tokenizer; pass token ids / token-id sequences here "
                        "(the CLI turns stop strings into both)")
    return items, stop_lib.pack_stop_sequences(items)


def finish(out, logp, stopped, n, stop_items) -> Generation:
    """Device outputs -> per-row lists, stripping the stop sequence a row ended with."""
    return Generation(*decode.output_rows(out, logp, stopped, n, stop_items))


def generate(model, params, prompts, *, max_new_tokens: int, sampling: sampling_lib.Sampling = sampling_lib.GREEDY,
             seed=0, stop=None, eos_id=None, lengths=None, return_logprobs: bool = False,
             max_len: Optional[int] = None, quantize_kv: bool = False, bucket: bool = True) -> Generation:
    """Generate up to max_new_tokens for each prompt.

    prompts: token-id lists, or a padded [B, T] int array with `lengths [B]`. For T5 the prompt is the encoder input.
    sampling: a `Sampling` (default greedy). seed: int (row b uses seed + b) or one seed per row.
    stop / eos_id: stop token ids and token-id sequences. max_len: cache length (default: bucketed prompt length +
    max_new_tokens); a row whose cache is full stops with reason "length". quantize_kv: int8 KV cache.
    """
    prompt_lib.check_options(model.cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, stop=stop, max_len=max_len)
    rows = checked_rows(model, prompts, lengths, max_new_tokens, max_len)
    seeds = prompt_lib.row_seeds(seed, len(rows), len(rows))
    stop_items, _ = stop_arg(stop, eos_id)
    return Generation(*decode.generate_rows(
        model, params, rows, max_new=max_new_tokens, sampling=sampling, seeds=seeds, stop_items=stop_items,
        max_len=max_len, bucket=bucket, want_logprobs=return_logprobs, quantize=quantize_kv))


# ------------------------------------------------------------------------------------------------ streaming
def _stream_prefill(model, params, ids, lens, live, enc_ids, enc_mask, *, max_new, max_len, sampling, want_logprobs,
                    quantize):
    enc = None if enc_ids is None else decode.encode(model, params, enc_ids, enc_mask)
    st = decode.prefill(decode.step_fn(model, params, enc, enc_mask), model.cfg, ids, lens, live, max_new=max_new,
                        max_len=max_len, sampling=sampling, want_logprobs=want_logprobs, quantize=quantize)
    return st, enc


def _stream_step(model, params, st, enc, enc_mask, seeds, stop_packed, *, sampling):
    st = decode.decode_step(decode.step_fn(model, params, enc, enc_mask), st, seeds, stop_packed, sampling=sampling)
    return st, st.out[:, st.i - 1], st.done


def stream(model, params, prompts, *, max_new_tokens: int, sampling: sampling_lib.Sampling = sampling_lib.GREEDY,
           seed=0, stop=None, eos_id=None, lengths=None, max_len: Optional[int] = None, quantize_kv: bool = False,
           bucket: bool = True) -> Iterator[np.ndarray]:
    """Yield the new token of every prompt at each step, [B] int (-1 for rows already finished), same tokens as
    `generate` (stop tokens included here: the caller sees them arrive). The cache is donated step to step. The
    weights are laid out for decoding once per call (host side: each step is its own program) and dropped when the
    stream ends."""
    prompt_lib.check_options(model.cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, stop=stop, max_len=max_len)
    d = prepare(model, prompts, lengths, max_new_tokens, max_len, seed, bucket)
    _, packed = stop_arg(stop, eos_id)
    model, params = decode.decoding_layout(model, params)
    prefill_fn = decode.compiled(_stream_prefill, model,
                                 static_argnames=("max_new", "max_len", "sampling", "want_logprobs", "quantize"))
    step = decode.compiled(_stream_step, model, static_argnames=("sampling",), donate_argnames=("st",))
    st, enc = prefill_fn(params, d.ids, d.lens, d.live, d.enc_ids, d.enc_mask, max_new=max_new_tokens,
                         max_len=d.max_len, sampling=sampling, want_logprobs=False, quantize=quantize_kv)
    for _ in range(max_new_tokens):
        st, tok, done = step(params, st, enc, d.enc_mask, d.seeds, packed, sampling=sampling)
        yield np.asarray(tok)[: d.n]
        if np.asarray(done)[: d.n].all():
            return
