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
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx.cache import KVCache
from jaxtx.infer import prompts as P
from jaxtx.infer import sampling as S
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


def _step_fn(model, params, enc=None, enc_mask=None):
    """(ids [B, T], pos [B, T], cache, logits_at=None) -> (logits [B, T|N, V], cache) for the model's family."""
    if model.cfg.kind == "encoder_decoder":
        return lambda ids, pos, cache, logits_at=None: model.apply(
            {"params": params}, ids, enc, enc_mask, positions=pos, cache=cache, logits_at=logits_at, method="decode")
    if model.cfg.kind != "decoder":
        raise ValueError(f"generate: model kind {model.cfg.kind!r} cannot generate (use jaxtx.infer.embed for "
                         "encoders)")
    return lambda ids, pos, cache, logits_at=None: model.apply({"params": params}, ids, positions=pos, cache=cache,
                                                               logits_at=logits_at)


def prefill_cache(step, cfg, ids_BT, lens_B, *, max_len, spare=0, quantize=False, cache_dtype=jnp.float32):
    """The prompts (right-padded; padding gets position -1) into a fresh cache -> (logits at each row's last prompt
    token [B, V] float32, cache). `spare`: extra ring-buffer slots for sliding-window models (speculative drafts)."""
    B, T = ids_BT.shape
    cache = KVCache.init(cfg, B, max_len, dtype=cache_dtype, quantize=quantize, spare=spare)
    t = jnp.arange(T)[None, :]
    pos_BT = jnp.where(t < lens_B[:, None], t, -1)
    last = jnp.maximum(lens_B - 1, 0)
    logits_B1V, cache = step(ids_BT, pos_BT, cache, logits_at=last[:, None])  # the head only at the last prompt token
    return logits_B1V[:, 0].astype(jnp.float32), cache


def prefill(step, cfg, ids_BT, lens_B, live_B, *, max_new, max_len, sampling, want_logprobs, quantize=False,
            cache_dtype=jnp.float32) -> DecodeState:
    """Run the prompts through the model and set up the loop state."""
    B, T = ids_BT.shape
    logits_BV, cache = prefill_cache(step, cfg, ids_BT, lens_B, max_len=max_len, quantize=quantize,
                                     cache_dtype=cache_dtype)
    seen, counts = S.init_penalty_state(ids_BT, jnp.arange(T)[None, :] < lens_B[:, None], cfg.vocab_size, sampling)
    return DecodeState(
        i=jnp.zeros((), jnp.int32), logits=logits_BV, cache=cache, pos=lens_B.astype(jnp.int32), done=~live_B,
        stopped=jnp.zeros(B, bool), out=jnp.full((B, max_new), -1, jnp.int32),
        logp=jnp.zeros((B, max_new), jnp.float32) if want_logprobs else None, seen=seen, counts=counts)


def decode_step(step, st: DecodeState, seeds_B, stop_packed, *, sampling, ring: bool) -> DecodeState:
    """Sample one token per live row, record it, then (if any row goes on) feed it through the model."""
    live = ~st.done
    keys = None if sampling.greedy else S.row_keys(seeds_B, st.i)
    tok = S.sample(st.logits, sampling, keys, seen_BV=st.seen, counts_BV=st.counts)
    out = st.out.at[:, st.i].set(jnp.where(live, tok, -1))
    logp = st.logp
    if logp is not None:
        logp = logp.at[:, st.i].set(jnp.where(live, S.token_logprobs(st.logits, tok), 0.0))
    seen, counts = S.update_penalty_state(st.seen, st.counts, tok, live)
    stop_now = live & stop_lib.ends_with_stop(out, jnp.full_like(st.pos, st.i + 1), stop_packed)
    # A full (non-ring) cache cannot take this token, so the row cannot produce another one.
    full = jnp.zeros_like(live) if ring else st.pos >= st.cache.slots
    done = st.done | stop_now | full | (st.i + 1 >= out.shape[1])

    # Finished rows feed position -1 (nothing written). Once every row is done this forward is wasted (one step per
    # generation); guarding it with lax.cond made XLA copy every layer's K and V in and out of the conditional on
    # every step (96 x 6.3 MB per step at batch 8, 110M model: 5.5 ms of a 40 ms step).
    logits, cache = step(jnp.maximum(tok, 0)[:, None], jnp.where(done, -1, st.pos)[:, None], st.cache)
    logits = logits[:, 0].astype(jnp.float32)
    return DecodeState(i=st.i + 1, logits=logits, cache=cache, pos=st.pos + 1, done=done,
                       stopped=st.stopped | stop_now, out=out, logp=logp, seen=seen, counts=counts)


def _encode(model, params, enc_ids, enc_mask):
    return model.apply({"params": params}, enc_ids, enc_mask, method="encode")


def _run(model, params, ids_BT, lens_B, live_B, seeds_B, stop_packed, enc_ids, enc_mask, *, max_new, max_len,
         sampling, want_logprobs, quantize):
    """The whole generation as one program (jitted by `_compiled`)."""
    cfg = model.cfg
    enc = None if enc_ids is None else _encode(model, params, enc_ids, enc_mask)
    step = _step_fn(model, params, enc, enc_mask)
    st = prefill(step, cfg, ids_BT, lens_B, live_B, max_new=max_new, max_len=max_len, sampling=sampling,
                 want_logprobs=want_logprobs, quantize=quantize)
    body = functools.partial(decode_step, step, seeds_B=seeds_B, stop_packed=stop_packed, sampling=sampling,
                             ring=cfg.window is not None)
    st = jax.lax.while_loop(lambda s: (s.i < max_new) & ~jnp.all(s.done), body, st)
    return st.out, st.logp, st.stopped


_STATIC = ("max_new", "max_len", "sampling", "want_logprobs", "quantize")
_JITTED: dict = {}


def _compiled(model):
    """One jitted program per model object; jax caches one executable per shape bucket and static setting."""
    key = id(model)
    if key not in _JITTED or _JITTED[key][0] is not model:
        _JITTED[key] = (model, jax.jit(functools.partial(_run, model), static_argnames=_STATIC))
    return _JITTED[key][1]


def _prepare(model, prompts, lengths, max_new_tokens, max_len, seed, bucket, encoder_mask=None):
    """Host side: validate, pad to the bucket, pick the cache length. Returns a dict of device inputs + sizes."""
    cfg = model.cfg
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    rows = P.as_rows(prompts, lengths)
    limit = cfg.max_seq_len if cfg.position == "learned" else None  # learned tables end at max_seq_len
    cap = min(x for x in (max_len, limit, 1 << 62) if x is not None)
    P.validate(rows, cfg.vocab_size, None if cfg.kind == "encoder_decoder" else cap)
    ids, lens, live = P.pad_batch(rows, bucket=bucket)
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
    seeds = P.row_seeds(seed, len(rows), ids.shape[0])
    return dict(ids=ids, lens=lens, live=live, seeds=seeds, enc_ids=enc_ids, enc_mask=enc_mask, n=len(rows),
                max_len=int(max_len))


def _stop_arg(stop, eos_id):
    items = list(stop or [])
    if eos_id is not None:
        items += list(np.atleast_1d(eos_id).tolist())
    if any(isinstance(s, str) for s in items):
        raise TypeError("stop: strings need a tokenizer; pass token ids / token-id sequences here "
                        "(the CLI turns stop strings into both)")
    return items, stop_lib.pack_stop_sequences(items)


def _finish(out, logp, stopped, n, stop_items) -> Generation:
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


def generate(model, params, prompts, *, max_new_tokens: int, sampling: S.Sampling = S.GREEDY, seed=0, stop=None,
             eos_id=None, lengths=None, return_logprobs: bool = False, max_len: Optional[int] = None,
             quantize_kv: bool = False, bucket: bool = True) -> Generation:
    """Generate up to max_new_tokens for each prompt.

    prompts: token-id lists, or a padded [B, T] int array with `lengths [B]`. For T5 the prompt is the encoder input.
    sampling: a `Sampling` (default greedy). seed: int (row b uses seed + b) or one seed per row.
    stop / eos_id: stop token ids and token-id sequences. max_len: cache length (default: bucketed prompt length +
    max_new_tokens); a row whose cache is full stops with reason "length". quantize_kv: int8 KV cache.
    """
    P.check_options(model.cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, stop=stop, max_len=max_len)
    d = _prepare(model, prompts, lengths, max_new_tokens, max_len, seed, bucket)
    stop_items, packed = _stop_arg(stop, eos_id)
    out, logp, stopped = _compiled(model)(
        params, d["ids"], d["lens"], d["live"], d["seeds"], packed, d["enc_ids"], d["enc_mask"],
        max_new=max_new_tokens, max_len=d["max_len"], sampling=sampling, want_logprobs=return_logprobs,
        quantize=quantize_kv)
    return _finish(out, logp, stopped, d["n"], stop_items)


# ------------------------------------------------------------------------------------------------ streaming
@functools.partial(jax.jit, static_argnames=("model", "max_new", "max_len", "sampling", "want_logprobs", "quantize"))
def _stream_prefill(model, params, ids, lens, live, enc_ids, enc_mask, *, max_new, max_len, sampling, want_logprobs,
                    quantize):
    enc = None if enc_ids is None else _encode(model, params, enc_ids, enc_mask)
    st = prefill(_step_fn(model, params, enc, enc_mask), model.cfg, ids, lens, live, max_new=max_new, max_len=max_len,
                 sampling=sampling, want_logprobs=want_logprobs, quantize=quantize)
    return st, enc


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnames=("st",))
def _stream_step(model, params, st, enc, enc_mask, seeds, stop_packed, *, sampling):
    step = _step_fn(model, params, enc, enc_mask)
    st = decode_step(step, st, seeds, stop_packed, sampling=sampling, ring=model.cfg.window is not None)
    return st, st.out[:, st.i - 1], st.done


def stream(model, params, prompts, *, max_new_tokens: int, sampling: S.Sampling = S.GREEDY, seed=0, stop=None,
           eos_id=None, lengths=None, max_len: Optional[int] = None, quantize_kv: bool = False,
           bucket: bool = True) -> Iterator[np.ndarray]:
    """Yield the new token of every prompt at each step, [B] int (-1 for rows already finished), same tokens as
    `generate` (stop tokens included here: the caller sees them arrive). The cache is donated step to step."""
    P.check_options(model.cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, stop=stop, max_len=max_len)
    d = _prepare(model, prompts, lengths, max_new_tokens, max_len, seed, bucket)
    _, packed = _stop_arg(stop, eos_id)
    st, enc = _stream_prefill(model, params, d["ids"], d["lens"], d["live"], d["enc_ids"], d["enc_mask"],
                              max_new=max_new_tokens, max_len=d["max_len"], sampling=sampling, want_logprobs=False,
                              quantize=quantize_kv)
    for _ in range(max_new_tokens):
        st, tok, done = _stream_step(model, params, st, enc, d["enc_mask"], d["seeds"], packed, sampling=sampling)
        yield np.asarray(tok)[: d["n"]]
        if np.asarray(done)[: d["n"]].all():
            return


def for_decoding(model, params):
    """(model, params) laid out for fast decoding: scanned layers unrolled (the KV cache then follows: one buffer
    per layer).

    In a scanned stack XLA's while loop dynamic-slices each layer's weights out of the stacked params before its
    matmuls, a copy of every weight per step on top of the read that decode is bound by (`jaxtx bench decode --scan`,
    110M model, CPU: unrolled 1.5-1.9x faster; H100: 1.1x at batch 1, 1.7x at batch 8). Same math, same tokens; costs
    one copy of the params.
    """
    from jaxtx import model as M
    if model.cfg.kind != "decoder" or not model.cfg.scan_layers:
        return model, params
    return M.build(model.cfg.replace(scan_layers=False)), M.unstack_layers(params)
