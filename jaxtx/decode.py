"""The static-cache decode loop: prefill, then one compiled `lax.while_loop` of single-token steps over a `KVCache`.

Core, so that both users share one loop: `jaxtx.infer.generation` (generate / stream, beam search and speculative
decoding drive the same pieces) and train's end-of-run samples (`jaxtx.train.sample`), whose tokens are then by
construction the ones `jaxtx generate` gives on the same run dir.

    toks, reasons, logprobs = generate_rows(model, params, [[1, 5, 9], [1, 7]], max_new=32, stop_items=[eos_id])

The loop state is one pytree (`DecodeState`): the last logits, the KV cache, each row's next position, done flags, the
output buffer and the penalty counts. `decode_step` advances it by one token; `run` runs it inside a `lax.while_loop`
(condition: tokens left, some row not finished; a row also finishes when its cache is full).

Decoder-only models and T5 share the loop: the only difference is the step function (T5 decodes against an encoder
output computed once; its first decode call fills the cross-attention K/V in the cache).

Buckets bound the number of compilations: the prompt length rounds up to a power of two (at least MIN_LEN_BUCKET) and
the batch to a power of two, so every batch lands on one of a few (B, T) shapes. Padding tokens get position -1
(never written to the cache, never visible) and padding rows start finished, so neither changes any real row's tokens.

Nothing here validates user input: callers hand in checked rows (infer goes through `jaxtx.infer.prompts` first).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx import model as model_lib
from jaxtx import sampling as sampling_lib
from jaxtx import stop as stop_lib
from jaxtx.cache import KVCache

MIN_LEN_BUCKET = 16


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


# ------------------------------------------------------------------------------------------------ device side
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


def encode(model, params, enc_ids, enc_mask):
    """T5: the encoder output [B, S, D] that every decode step attends to."""
    return model.apply({"params": params}, enc_ids, enc_mask, method="encode")


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


@functools.lru_cache(maxsize=None)
def _unrolled(cfg):
    return model_lib.build(cfg.replace(scan_layers=False))


def decoding_layout(model, params):
    """(model, params) with scanned layers unrolled, for use INSIDE a jitted decode program.

    A scanned stack makes XLA dynamic-slice every layer's weights out of the stacked params on every decode step, a
    copy of all weights per token on top of the read decode is bound by (measured in `jaxtx.infer.for_decoding`).
    Unstacking inside the program happens once per call (XLA hoists it out of the decode loop), and the unstacked
    weights are a temporary of that call: nothing is kept alive between calls. Models that are not jaxtx stacks
    (test doubles) and already unrolled ones pass through.
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, (model_lib.DecoderLM, model_lib.EncoderDecoderModel)) or not cfg.scan_layers:
        return model, params
    return _unrolled(cfg), model_lib.unstack_layers(params)


def run(model, params, ids_BT, lens_B, live_B, seeds_B, stop_packed, enc_ids, enc_mask, *, max_new, max_len,
        sampling, want_logprobs, quantize):
    """The whole generation as one program (jitted by `program`) -> (out [B, max_new] int32, -1 after a row
    finished; logp [B, max_new] float32 or None; stopped [B] bool)."""
    model, params = decoding_layout(model, params)
    cfg = model.cfg
    enc = None if enc_ids is None else encode(model, params, enc_ids, enc_mask)
    step = step_fn(model, params, enc, enc_mask)
    st = prefill(step, cfg, ids_BT, lens_B, live_B, max_new=max_new, max_len=max_len, sampling=sampling,
                 want_logprobs=want_logprobs, quantize=quantize)
    body = functools.partial(decode_step, step, seeds_B=seeds_B, stop_packed=stop_packed, sampling=sampling)
    st = jax.lax.while_loop(lambda s: (s.i < max_new) & ~jnp.all(s.done), body, st)
    return st.out, st.logp, st.stopped


_PROGRAMS: dict = {}


def compiled(fn, *models, static_argnames=(), donate_argnames=()):
    """`fn(*models, ...)` jitted once per (fn, model objects): the one jit cache of the decode programs (generate,
    stream, beam, speculative, the serving engine, train's samples). Models are held by the entry, so an id is never
    reused while its entry lives; jax then caches one executable per shape bucket and static setting."""
    key = (fn,) + tuple(id(m) for m in models)
    hit = _PROGRAMS.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], models)):
        hit = _PROGRAMS[key] = (models, jax.jit(functools.partial(fn, *models), static_argnames=static_argnames,
                                                donate_argnames=donate_argnames))
    return hit[1]


def program(model):
    """The jitted whole-generation program (`run`) of `model`, one per model object."""
    return compiled(run, model, static_argnames=("max_new", "max_len", "sampling", "want_logprobs", "quantize"))


# ------------------------------------------------------------------------------------------------ host side
def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def pad_batch(rows: Sequence[np.ndarray], *, bucket: bool = True, pad_id: int = 0):
    """-> ids [Bb, Tb] int32 (right-padded), lens [Bb] int32 (0 for padding rows), live [Bb] bool."""
    B, T = len(rows), max(r.size for r in rows)
    Bb, Tb = (next_pow2(B), next_pow2(T, MIN_LEN_BUCKET)) if bucket else (B, T)
    ids = np.full((Bb, Tb), pad_id, np.int32)
    lens = np.zeros(Bb, np.int32)
    for b, r in enumerate(rows):
        ids[b, : r.size] = r
        lens[b] = r.size
    return ids, lens, np.arange(Bb) < B


def position_limit(cfg) -> Optional[int]:
    """The most positions the model can encode: learned position tables end at max_seq_len; None = no limit."""
    return cfg.max_seq_len if cfg.position == "learned" else None


class Batch(NamedTuple):
    """Device inputs of one decoding call (numpy arrays, padded to the shape buckets)."""

    ids: np.ndarray  # [B, T] int32 decoder prompt (T5: [B, 1] start tokens)
    lens: np.ndarray  # [B] int32
    live: np.ndarray  # [B] bool, False for bucket padding rows
    enc_ids: Optional[np.ndarray]  # [B, S] T5 encoder input, else None
    enc_mask: Optional[np.ndarray]  # [B, S] int32
    max_len: int  # cache length


def layout_batch(cfg, rows: Sequence[np.ndarray], max_new: int, max_len: Optional[int] = None,
                 bucket: bool = True) -> Batch:
    """Checked prompt rows (1-D int arrays) -> padded device inputs and the cache length (default: the bucketed
    prompt length + max_new, itself a bucket; never past the position limit)."""
    ids, lens, live = pad_batch(rows, bucket=bucket)
    if cfg.kind == "encoder_decoder":
        # the prompt feeds the encoder; the decoder starts from decoder_start_token_id = 0 (T5's pad id)
        enc_ids, enc_mask = ids, (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int32)
        ids, lens = np.zeros((ids.shape[0], 1), np.int32), np.where(live, 1, 0).astype(np.int32)
    else:
        enc_ids = enc_mask = None
    if max_len is None:
        max_len = ids.shape[1] + max_new
    limit = position_limit(cfg)
    if limit is not None:
        max_len = min(max_len, limit)
    return Batch(ids=ids, lens=lens, live=live, enc_ids=enc_ids, enc_mask=enc_mask, max_len=int(max_len))


def output_rows(out, logp, stopped, n: int, stop_items) -> tuple[list, list, Optional[list]]:
    """Device outputs -> (tokens, finish reasons, logprobs or None) per real row, stripping the stop sequence a row
    ended with. Reasons: "stop" (a stop token / sequence) or "length" (max_new or a full cache)."""
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
    return toks, reasons, (lps if logp is not None else None)


def generate_rows(model, params, rows: Sequence[Sequence[int]], *, max_new: int,
                  sampling: sampling_lib.Sampling = sampling_lib.GREEDY, seeds=None, stop_items=(),
                  max_len: Optional[int] = None, bucket: bool = True, want_logprobs: bool = False,
                  quantize: bool = False) -> tuple[list, list, Optional[list]]:
    """Up to max_new new tokens per row through `program` -> `output_rows`. rows: checked token-id rows (in the
    vocabulary, each fitting the cache). seeds: one uint32 per row (None: zeros; unused by greedy). stop_items: stop
    token ids and token-id sequences."""
    rows = [np.asarray(r, np.int64).reshape(-1) for r in rows]
    d = layout_batch(model.cfg, rows, max_new, max_len, bucket)
    seeds_B = np.zeros(d.ids.shape[0], np.uint32)
    if seeds is not None:
        seeds_B[:len(rows)] = np.asarray(seeds, np.uint32)
    out, logp, stopped = program(model)(
        params, d.ids, d.lens, d.live, seeds_B, stop_lib.pack_stop_sequences(stop_items), d.enc_ids, d.enc_mask,
        max_new=max_new, max_len=d.max_len, sampling=sampling, want_logprobs=want_logprobs, quantize=quantize)
    return output_rows(out, logp, stopped, len(rows), stop_items)
