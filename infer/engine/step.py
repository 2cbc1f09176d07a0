"""The jitted ragged step and the multi-step decode loop.

One step runs every scheduled token of every running request through the model as one flat token axis [N] (N a
power-of-two bucket; the tail is padding: position -1, slot -1, never written), then samples one token for every
sequence whose last scheduled token is its last known token. Sequences are rows r < num_seqs of the fixed [R]
arrays (R = max_seqs), in the order their tokens sit on the flat axis; `slots [R]` names each one's row of the
penalty state, which lives on device (donated with the pages) so penalties cost no transfer.

Everything that varies from step to step is data (token ids, positions, page table, per-row sampling settings,
allowed-token bitmasks), so after warm-up the engine never compiles again: one executable per token bucket, plus one
per decode-loop bucket.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtx.infer.engine import sampling_batch as sb


class DeviceState(NamedTuple):
    cache: Any  # the paged KV cache (jaxtx.paged_cache.PagedKVCache): pages are updated in place
    seen: jax.Array  # [R, V] bool: token occurs in the prompt or output of the request in this penalty row
    counts: jax.Array  # [R, V] i32: occurrences in the generated output


class StepInputs(NamedTuple):
    ids: jax.Array  # [N] i32
    positions: jax.Array  # [N] i32, -1 = padding
    slot_mapping: jax.Array  # [N] i32, page * page_size + offset; -1 = not written
    page_table: jax.Array  # [R, W] i32
    kv_lens: jax.Array  # [R] i32, tokens of each sequence including this step's
    cu_q_lens: jax.Array  # [R + 1] i32
    num_seqs: jax.Array  # [] i32
    logits_at: jax.Array  # [R] i32, flat index of each sequence's last token this step
    sample: jax.Array  # [R] bool, the sequence samples a token this step
    slots: jax.Array  # [R] i32, penalty-state row of each sequence
    params: sb.RowParams
    allowed: jax.Array  # [R, ceil(V/32)] i32 bitmask
    targets: jax.Array  # [N] i32, the next prompt token of every flat token (prompt log-probs), else 0
    adapters: Any = None  # [N] i32 LoRA adapter slot of every flat token (0 = base); None: no stacked adapters


class StepOutputs(NamedTuple):
    tokens: jax.Array  # [R] i32 (meaningful where sample)
    logprob: jax.Array  # [R] f32
    top_ids: jax.Array  # [R, n_top] i32
    top_logprobs: jax.Array  # [R, n_top] f32
    prompt_logprobs: Any  # [N] f32 (all-logits variant) or None


def bare_cache(cache):
    """The cache without the step metadata with_step attached (the structure PagedKVCache.init returns), so the
    donated state and the decode loop's carry keep one pytree structure whatever the bucket."""
    return cache.without_step() if hasattr(cache, "without_step") else cache


def _forward(model, params, cache, ids_N, pos_N, slot_N, page_table, kv_lens, cu_q_lens, num_seqs, at_M,
             adapters_N):
    cache = cache.with_step(slot_N, page_table, kv_lens, cu_q_lens, num_seqs)
    extra = {} if adapters_N is None else {"adapter_ids": adapters_N[None]}  # data, not static: no compile per mix
    logits, cache = model.apply({"params": params}, ids_N[None], positions=pos_N[None], cache=cache,
                                logits_at=at_M[None], **extra)
    return logits[0], bare_cache(cache)


def ragged_step(model, params, state: DeviceState, inp: StepInputs, *, all_logits: bool, n_top: int):
    """One scheduling round on device -> (state, StepOutputs). all_logits: logits of every flat token (prompt
    log-probs) instead of only each sequence's last one."""
    N = inp.ids.shape[0]
    at = jnp.arange(N, dtype=jnp.int32) if all_logits else inp.logits_at
    logits, cache = _forward(model, params, state.cache, inp.ids, inp.positions, inp.slot_mapping, inp.page_table,
                             inp.kv_lens, inp.cu_q_lens, inp.num_seqs, at, inp.adapters)
    prompt_lp = None
    if all_logits:
        prompt_lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                                        inp.targets[:, None], axis=-1)[:, 0]
        logits = logits[inp.logits_at]
    live = inp.sample & (jnp.arange(inp.sample.shape[0]) < inp.num_seqs)
    seen, counts = state.seen[inp.slots], state.counts[inp.slots]
    tok, lp, top_ids, top_lp = sb.sample_rows(logits, inp.params, seen, counts, inp.allowed, n_top=n_top)
    seen, counts = sb.update_penalty_state(state.seen, state.counts, inp.slots, tok, live)
    return DeviceState(cache, seen, counts), StepOutputs(tok, lp, top_ids, top_lp, prompt_lp)


class LoopOutputs(NamedTuple):
    tokens: jax.Array  # [steps, R] i32, -1 after a row finished / for rows not running
    logprob: jax.Array  # [steps, R] f32
    top_ids: jax.Array  # [steps, R, n_top]
    top_logprobs: jax.Array  # [steps, R, n_top]
    n: jax.Array  # [] i32, steps actually run


def decode_loop(model, params, state: DeviceState, inp: StepInputs, stop_ids_RS, remaining_R, *, steps: int,
                n_top: int, page_size: int):
    """Up to `steps` decode steps in one while loop (nothing waiting, every running sequence decoding: sequence r is
    flat token r). The page table already holds pages for every position the loop can reach. A row stops on device
    when it samples one of its stop token ids (stop_ids_RS, -1 padded) or has produced remaining_R tokens; it then
    feeds padding (position -1, nothing written). Multi-token stop sequences are checked on the host afterwards.
    inp.adapters (if any) stays as given: flat token r is sequence r at every step, so its adapter slot is fixed."""
    R, N = inp.kv_lens.shape[0], inp.ids.shape[0]
    rows = jnp.arange(R)
    to_flat = lambda a_R, fill: jnp.full((N,), fill, jnp.int32).at[:min(N, R)].set(a_R[:min(N, R)])
    out0 = LoopOutputs(jnp.full((steps, R), -1, jnp.int32), jnp.zeros((steps, R), jnp.float32),
                       jnp.zeros((steps, R, n_top), jnp.int32), jnp.zeros((steps, R, n_top), jnp.float32),
                       jnp.zeros((), jnp.int32))

    def body(carry):
        state, ids_R, kv_lens, done, rows_p, out = carry
        i = out.n
        pos = jnp.where(done, -1, kv_lens - 1)  # the fed token is the last of the sequence
        page = jnp.take_along_axis(inp.page_table, (jnp.maximum(pos, 0) // page_size)[:, None], axis=1)[:, 0]
        slot = jnp.where(pos >= 0, page * page_size + pos % page_size, -1)
        step_inp = inp._replace(ids=to_flat(ids_R, 0), positions=to_flat(pos, -1), slot_mapping=to_flat(slot, -1),
                                kv_lens=kv_lens, logits_at=rows.astype(jnp.int32), sample=~done, params=rows_p)
        state, o = ragged_step(model, params, state, step_inp, all_logits=False, n_top=n_top)
        tok = jnp.where(done, -1, o.tokens)
        hit = jnp.any((tok[:, None] == stop_ids_RS) & (stop_ids_RS >= 0), axis=1)
        new_done = done | hit | (i + 1 >= remaining_R)
        out = LoopOutputs(out.tokens.at[i].set(tok), out.logprob.at[i].set(o.logprob),
                          out.top_ids.at[i].set(o.top_ids), out.top_logprobs.at[i].set(o.top_logprobs), i + 1)
        rows_p = rows_p._replace(step=rows_p.step + (~done).astype(jnp.int32))
        return state, jnp.maximum(tok, 0), jnp.where(new_done, kv_lens, kv_lens + 1), new_done, rows_p, out

    ids_R = jnp.zeros(R, jnp.int32).at[:min(N, R)].set(inp.ids[:min(N, R)])
    carry = (state, ids_R, inp.kv_lens, rows >= inp.num_seqs, inp.params, out0)
    carry = jax.lax.while_loop(lambda c: (c[-1].n < steps) & ~jnp.all(c[3]), body, carry)
    return carry[0], carry[-1]
