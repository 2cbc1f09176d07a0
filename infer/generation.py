"""Batched generation: prefill, then one compiled `lax.while_loop` of single-token decode steps, all on device.

    out = generate(model, params, [[1, 5, 9], [1, 7]], max_new_tokens=32, sampling=Sampling(temperature=0.8))
    out.tokens        # new token ids per prompt (stop tokens / stop sequences excluded)
    out.finish_reasons  # "stop" | "length"

The loop state is one pytree (`DecodeState`): the last logits, the KV cache, each row's next position, done flags, the
output buffer and the penalty counts. `decode_step` advances it by one token; `generate` runs it inside a
`lax.while_loop` (condition: tokens left, some row not finished; a row also finishes when its cache is full), and
`stream` calls the same step jitted with the state donated, yielding tokens as they are produced.

Decoder-only models and T5 share the loop: the only difference is the step function (T5 decodes against an encoder
output computed once; its first decode call fills the cross-attention K/V in the cache).

Decode is fast by default: the jitted programs run a scanned model with its layers unrolled (`decoding_layout`),
because a scanned stack copies every layer's weights out of the stack on every step (see `for_decoding`). The
unstacked weights are a temporary of the call, not a second copy kept alive.

Beam search and speculative decoding drive the same pieces through this module's internal API: `step_fn`, `encode`,
`prefill` / `prefill_cache`, `decode_step`, `prepare` (host side), `stop_arg`, `finish`, `compiled` (the one jit
cache keyed by model) and `decoding_layout`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx import model as model_lib
from jaxtx.cache import KVCache
from jaxtx.infer import prompts as prompt_lib
from jaxtx.infer import sampling as sampling_lib
from jaxtx.infer import stop as stop_lib


@dataclasses.dataclass
class Generation:
    tokens: list  # list[list[int]]: new tokens per prompt, stop tokens / stop sequences excluded
    finish_reasons: list  # list[str]: "stop" (EOS / stop sequence) or "length" (max_new_tokens or cache full)
    logprobs: Optional[list] = None  # list[list[float]]: log p(token) under the model (raw logits), if requested


class DecodeState(NamedTuple):
    i: jax.Array  # scalar int32, tokens produced so far by live rows
    logits: jax.Array  # [B, V] float32, the distribution for the next token
    cache: KVCache
    pos: jax.Array  # [B] int32, position the next sampled token will take
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, finished by EOS / stop sequence (vs length)
    out: jax.Array  # [B, N] int32 new tokens, -1 after a row finished
    logp: Optional[jax.Array]  # [B, N] float32 or None
    seen: Optional[jax.Array]  # [B, V] bool, penalty state (None without penalties)
    counts: Optional[jax.Array]  # [B, V] int32


def step_fn(model, params, enc=None, enc_mask=None):
    """(ids [B, T], pos [B, T], cache, logits_at=None) -> (logits [B, T|N, V], cache) for the model's family."""
    if model.cfg.kind == "encoder_decoder":
        return lambda ids, pos, cache, logits_at=None: model.apply(
            {"params": params}, ids, enc, enc_mask, positions=pos, cache=cache, logits_at=logits_at, method="decode")
    if model.cfg.kind != "decoder":
        raise ValueError(f"generate: model kind {model.cfg.kind!r} cannot generate (use jaxtx.infer.embed for "
                         "encoders)")
    return lambda ids, pos, cache, logits_at=None: model.apply({"params": params}, ids, positions=pos, cache=cache,
                                                               logits_at=logits_at)


def prefill_cache(step, cfg, ids_BT, lens_B, *, max_len, spare=0, quantize=False, cache_dtype=None):
    """The prompts (right-padded; padding gets position -1) into a fresh cache -> (logits at each row's last prompt
    token [B, V] float32, cache). `spare`: extra ring-buffer slots for sliding-window models (speculative drafts).
    cache_dtype: None = the model's dtype."""
    B, T = ids_BT.shape
    cache = KVCache.init(cfg, B, max_len, dtype=cache_dtype, quantize=quantize, spare=spare)
    t = jnp.arange(T)[None, :]
    pos_BT = jnp.where(t < lens_B[:, None], t, -1)
    last = jnp.maximum(lens_B - 1, 0)
    logits_B1V, cache = step(ids_BT, pos_BT, cache, logits_at=last[:, None])  # the head only at the last prompt token
    return logits_B1V[:, 0].astype(jnp.float32), cache


def prefill(step, cfg, ids_BT, lens_B, live_B, *, max_new, max_len, sampling, want_logprobs, quantize=False,
            cache_dtype=None) -> DecodeState:
    """Run the prompts through the model and set up the loop state."""
    B, T = ids_BT.shape
    logits_BV, cache = prefill_cache(step, cfg, ids_BT, lens_B, max_len=max_len, quantize=quantize,
                                     cache_dtype=cache_dtype)
    prompt_BT = jnp.arange(T)[None, :] < lens_B[:, None]
    seen, counts = sampling_lib.init_penalty_state(ids_BT, prompt_BT, cfg.vocab_size, sampling)
    return DecodeState(
        i=jnp.zeros((), jnp.int32), logits=logits_BV, cache=cache, pos=lens_B.astype(jnp.int32), done=~live_B,
        stopped=jnp.zeros(B, bool), out=jnp.full((B, max_new), -1, jnp.int32),
        logp=jnp.zeros((B, max_new), jnp.float32) if want_logprobs else None, seen=seen, counts=counts)


def decode_step(step, st: DecodeState, seeds_B, stop_packed, *, sampling) -> DecodeState:
    """Sample one token per live row, record it, then (if any row goes on) feed it through the model."""
    live = ~st.done
    keys = None if sampling.greedy else sampling_lib.row_keys(seeds_B, st.i)
    tok = sampling_lib.sample(st.logits, sampling, keys, seen_BV=st.seen, counts_BV=st.counts)
    out = st.out.at[:, st.i].set(jnp.where(live, tok, -1))
    logp = st.logp
    if logp is not None:
        logp = logp.at[:, st.i].set(jnp.where(live, sampling_lib.token_logprobs(st.logits, tok), 0.0))
    seen, counts = sampling_lib.update_penalty_state(st.seen, st.counts, tok, live)
    stop_now = live & stop_lib.ends_with_stop(out, jnp.full_like(st.pos, st.i + 1), stop_packed)
    # A full cache cannot take this token, so the row cannot produce another one.
    done = st.done | stop_now | st.cache.is_full(st.pos) | (st.i + 1 >= out.shape[1])

    # Finished rows feed position -1 (nothing written). Once every row is done this forward is wasted (one step per
    # generation); guarding it with lax.cond made XLA copy every layer's K and V in and out of the conditional on
    # every step (96 x 6.3 MB per step at batch 8, 110M model: 5.5 ms of a 40 ms step).
    logits, cache = step(jnp.maximum(tok, 0)[:, None], jnp.where(done, -1, st.pos)[:, None], st.cache)
    logits = logits[:, 0].astype(jnp.float32)
    return DecodeState(i=st.i + 1, logits=logits, cache=cache, pos=st.pos + 1, done=done,
                       stopped=st.stopped | stop_now, out=out, logp=logp, seen=seen, counts=counts)


def encode(model, params, enc_ids, enc_mask):
    """T5: the encoder output [B, S, D] that every decode step attends to."""
    return model.apply({"params": params}, enc_ids, enc_mask, method="encode")


@functools.lru_cache(maxsize=None)
def _unrolled(cfg):
    return model_lib.build(cfg.replace(scan_layers=False))


def decoding_layout(model, params):
    """(model, params) with scanned layers unrolled, for use INSIDE a jitted decode program.

    A scanned stack makes XLA dynamic-slice every layer's weights out of the stacked params on every decode step, a
    copy of all weights per token on top of the read decode is bound by (measured in `for_decoding`). Unstacking
    inside the program happens once per call (XLA hoists it out of the decode loop), and the unstacked weights are a
    temporary of that call: nothing is kept alive between calls. Models that are not jaxtx stacks (test doubles)
    and already unrolled ones pass through.
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, (model_lib.DecoderLM, model_lib.EncoderDecoderModel)) or not cfg.scan_layers:
        return model, params
    return _unrolled(cfg), model_lib.unstack_layers(params)


def for_decoding(model, params):
    """(model, params) laid out for fast decoding outside jaxtx's own decode loops: scanned layers unrolled (the KV
    cache then follows: one buffer per layer). `generate`, `stream`, `beam_search` and `speculative_generate` do this
    themselves (see `decoding_layout`); this host-side form is for a caller that drives the model step by step.

    In a scanned stack XLA's while loop dynamic-slices each layer's weights out of the stacked params before its
    matmuls, a copy of every weight per step on top of the read that decode is bound by (`jaxtx bench decode --scan`,
    110M model, CPU: unrolled 1.5-1.9x faster; H100: 1.1x at batch 1, 1.7x at batch 8). Same math, same tokens; costs
    one copy of the params.
    """
    if model.cfg.kind != "decoder":
        return model, params
    return decoding_layout(model, params)


_PROGRAMS: dict = {}


def compiled(fn, *models, static_argnames=(), donate_argnames=()):
    """`fn(*models, ...)` jitted once per (fn, model objects): the one jit cache of infer (generate, stream, beam,
    speculative). Models are held by the entry, so an id is never reused while its entry lives; jax then caches one
    executable per shape bucket and static setting."""
    key = (fn,) + tuple(id(m) for m in models)
    hit = _PROGRAMS.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], models)):
        hit = _PROGRAMS[key] = (models, jax.jit(functools.partial(fn, *models), static_argnames=static_argnames,
                                                donate_argnames=donate_argnames))
    return hit[1]


def _run(model, params, ids_BT, lens_B, live_B, seeds_B, stop_packed, enc_ids, enc_mask, *, max_new, max_len,
         sampling, want_logprobs, quantize):
    """The whole generation as one program (jitted by `compiled`)."""
    model, params = decoding_layout(model, params)
    cfg = model.cfg
    enc = None if enc_ids is None else encode(model, params, enc_ids, enc_mask)
    step = step_fn(model, params, enc, enc_mask)
    st = prefill(step, cfg, ids_BT, lens_B, live_B, max_new=max_new, max_len=max_len, sampling=sampling,
                 want_logprobs=want_logprobs, quantize=quantize)
    body = functools.partial(decode_step, step, seeds_B=seeds_B, stop_packed=stop_packed, sampling=sampling)
    st = jax.lax.while_loop(lambda s: (s.i < max_new) & ~jnp.all(s.done), body, st)
    return st.out, st.logp, st.stopped


def generate_program(model):
    """The jitted whole-generation program of `model` (one per model object; bench and tests call it directly)."""
    return compiled(_run, model, static_argnames=("max_new", "max_len", "sampling", "want_logprobs", "quantize"))


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


def prepare(model, prompts, lengths, max_new_tokens, max_len, seed, bucket) -> Prepared:
    """Host side: validate, pad to the bucket, pick the cache length."""
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    rows = prompt_lib.as_rows(prompts, lengths)
    limit = cfg.max_seq_len if cfg.position == "learned" else None  # learned tables end at max_seq_len
    cap = min(x for x in (max_len, limit, 1 << 62) if x is not None)
    prompt_lib.validate(rows, cfg.vocab_size, None if cfg.kind == "encoder_decoder" else cap)
    ids, lens, live = prompt_lib.pad_batch(rows, bucket=bucket)
    if cfg.kind == "encoder_decoder":
        # the prompt feeds the encoder; the decoder starts from decoder_start_token_id = 0 (T5's pad id)
        enc_ids, enc_mask = ids, (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int32)
        ids, lens = np.zeros((ids.shape[0], 1), np.int32), np.where(live, 1, 0).astype(np.int32)
    else:
        enc_ids = enc_mask = None
    if max_len is None:
        max_len = ids.shape[1] + max_new_tokens  # bucketed, so it is a bucket too
    if limit is not None:
        max_len = min(max_len, limit)
    seeds = prompt_lib.row_seeds(seed, len(rows), ids.shape[0])
    return Prepared(ids=ids, lens=lens, live=live, seeds=seeds, enc_ids=enc_ids, enc_mask=enc_mask, n=len(rows),
                    max_len=int(max_len))


def stop_arg(stop, eos_id):
    """(stop items as given + eos ids, their packed device form for `stop.ends_with_stop`)."""
    items = list(stop or [])
    if eos_id is not None:
        items += list(np.atleast_1d(eos_id).tolist())
    if any(isinstance(s, str) for s in items):
        raise TypeError("stop: strings need a tokenizer; pass token ids / token-id sequences here "
                        "(the CLI turns stop strings into both)")
    return items, stop_lib.pack_stop_sequences(items)


def finish(out, logp, stopped, n, stop_items) -> Generation:
    """Device outputs -> per-row lists, stripping the stop sequence a row ended with."""
    out, stopped = np.asarray(out)[:n], np.asarray(stopped)[:n]
    logp = None if logp is None else np.asarray(logp)[:n]
    seqs = [[int(s)] if np.ndim(s) == 0 else [int(t) for t in s] for s in stop_items]
    toks, lps, reasons = [], [], []
    for b in range(n):
        row = out[b][out[b] >= 0].tolist()
        k = len(row)
        if stopped[b]:
            k -= max((len(s) for s in seqs if s and row[-len(s):] == s), default=0)
        toks.append(row[:k])
        lps.append(None if logp is None else logp[b, :k].tolist())
        reasons.append("stop" if stopped[b] else "length")
    return Generation(toks, reasons, lps if logp is not None else None)


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
    d = prepare(model, prompts, lengths, max_new_tokens, max_len, seed, bucket)
    stop_items, packed = stop_arg(stop, eos_id)
    out, logp, stopped = generate_program(model)(
        params, d.ids, d.lens, d.live, d.seeds, packed, d.enc_ids, d.enc_mask, max_new=max_new_tokens,
        max_len=d.max_len, sampling=sampling, want_logprobs=return_logprobs, quantize=quantize_kv)
    return finish(out, logp, stopped, d.n, stop_items)


# ------------------------------------------------------------------------------------------------ streaming
def _stream_prefill(model, params, ids, lens, live, enc_ids, enc_mask, *, max_new, max_len, sampling, want_logprobs,
                    quantize):
    enc = None if enc_ids is None else encode(model, params, enc_ids, enc_mask)
    st = prefill(step_fn(model, params, enc, enc_mask), model.cfg, ids, lens, live, max_new=max_new, max_len=max_len,
                 sampling=sampling, want_logprobs=want_logprobs, quantize=quantize)
    return st, enc


def _stream_step(model, params, st, enc, enc_mask, seeds, stop_packed, *, sampling):
    st = decode_step(step_fn(model, params, enc, enc_mask), st, seeds, stop_packed, sampling=sampling)
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
    model, params = decoding_layout(model, params)
    prefill_fn = compiled(_stream_prefill, model,
                          static_argnames=("max_new", "max_len", "sampling", "want_logprobs", "quantize"))
    step = compiled(_stream_step, model, static_argnames=("sampling",), donate_argnames=("st",))
    st, enc = prefill_fn(params, d.ids, d.lens, d.live, d.enc_ids, d.enc_mask, max_new=max_new_tokens,
                         max_len=d.max_len, sampling=sampling, want_logprobs=False, quantize=quantize_kv)
    for _ in range(max_new_tokens):
        st, tok, done = step(params, st, enc, d.enc_mask, d.seeds, packed, sampling=sampling)
        yield np.asarray(tok)[: d.n]
        if np.asarray(done)[: d.n].all():
            return
