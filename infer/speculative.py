"""Speculative decoding: a draft model proposes k tokens, the target checks them in one forward pass of k+1 tokens.

One round per row, all rows in lock-step inside one `lax.while_loop`:
  1. the draft, fed the last emitted token `cur` (position n), proposes d_1..d_k from its sampling distributions q_i;
  2. the target runs [cur, d_1..d_k] at positions n..n+k and gives p_1..p_{k+1};
  3. `speculative_rule.accept` keeps a prefix of the drafts and adds one token (correction or bonus), so each round
     emits 1..k+1 tokens distributed exactly as target-only sampling (greedy: exactly the target's greedy tokens).
When all k drafts are accepted the draft has not yet seen d_k, so its next round starts with the 2-token chunk
[d_k, cur] (otherwise the first slot is padding, position -1) — one compiled shape for every round.

Rejected drafts: after each round both caches are truncated (`KVCache.truncate`) to the positions whose tokens were
kept, so `lengths` is each row's next position and slots holding rejected drafts are marked empty (pos -1). Relying
on the next round to overwrite them before they are read holds for a plain cache (the layer writes first, then
attends) but not for a sliding-window one, whose multi-token chunks attend over the old cache before writing.

Sliding-window models: verification writes up to k positions past the last kept token, so the ring buffer gets k
spare slots (`KVCache.init(..., spare=k)`, window + k slots); a rejected draft then only overwrites a position that
has already left every later query's window.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx import decode
from jaxtx import sampling as sampling_lib
from jaxtx import stop as stop_lib
from jaxtx.infer import generation
from jaxtx.infer.prompts import check_options
from jaxtx.infer.speculative_rule import accept


@dataclasses.dataclass
class SpeculativeResult(generation.Generation):
    acceptance_rate: float = 0.0  # accepted drafts / proposed drafts (over live rows and rounds)
    tokens_per_round: float = 0.0  # mean tokens emitted per target forward pass (per live row)
    rounds: int = 0


def _dist(logits_BV, sampling):
    return sampling_lib.probs(logits_BV, sampling)


def _draw(probs_BV, keys_B):
    return jax.vmap(jax.random.categorical)(keys_B, jnp.log(jnp.maximum(probs_BV, 1e-38))
                                            + jnp.where(probs_BV > 0, 0.0, -1e30)).astype(jnp.int32)


class SpecState(NamedTuple):
    r: jax.Array  # scalar int32, rounds run
    cur: jax.Array  # [B] int32, the last emitted token (fed to both models next round, at position pos)
    pos: jax.Array  # [B] int32, position of cur
    pend_tok: jax.Array  # [B] int32, d_k of the last round when all drafts were accepted (the draft has not seen it)
    pend: jax.Array  # [B] bool, pend_tok is pending
    tcache: object  # target KV cache (positions < pos)
    dcache: object  # draft KV cache (positions < pos, less d_k when pending)
    out: jax.Array  # [B, max_new + k + 1] int32 emitted tokens, -1 padded
    count: jax.Array  # [B] int32 tokens emitted
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, finished by a stop token / sequence
    n_acc: jax.Array  # [B] int32 accepted drafts (all rounds)
    rounds: jax.Array  # [B] int32 rounds in which the row was live


def _run(target, draft, tparams, dparams, ids_BT, lens_B, live_B, seeds_B, stop_packed, *, k, max_new, max_len,
         sampling):
    """The whole generation as one program. Returns a dict: out [B, max_new + k + 1] (-1 padded), stopped [B],
    n_acc / rounds [B] (accepted drafts, rounds per row), count [B] (tokens emitted, before the host trims to
    max_new), and the final target / draft caches."""
    B = ids_BT.shape[0]
    target, tparams = decode.decoding_layout(target, tparams)
    draft, dparams = decode.decoding_layout(draft, dparams)
    tstep, dstep = decode.step_fn(target, tparams), decode.step_fn(draft, dparams)
    tlogits0, tcache0 = decode.prefill_cache(tstep, target.cfg, ids_BT, lens_B, max_len=max_len, spare=k)
    _, dcache0 = decode.prefill_cache(dstep, draft.cfg, ids_BT, lens_B, max_len=max_len, spare=k)
    keys = lambda r, j: sampling_lib.row_keys(seeds_B, r * (k + 2) + j)  # noqa: E731  independent streams per round
    first = sampling_lib.sample(tlogits0, sampling, None if sampling.greedy else keys(0, k + 1))
    N = max_new + k + 1  # a round may overshoot max_new by up to k tokens; trimmed on the host
    out = jnp.full((B, N), -1, jnp.int32).at[:, 0].set(jnp.where(live_B, first, -1))
    count = live_B.astype(jnp.int32)
    stopped = live_B & stop_lib.ends_with_stop(out, count, stop_packed)
    done = ~live_B | stopped | (count >= max_new)
    zero = jnp.zeros(B, jnp.int32)
    state = SpecState(r=jnp.zeros((), jnp.int32), cur=first, pos=lens_B.astype(jnp.int32), pend_tok=zero,
                      pend=jnp.zeros(B, bool), tcache=tcache0, dcache=dcache0, out=out, count=count, done=done,
                      stopped=stopped, n_acc=zero, rounds=zero)

    def body(s: SpecState) -> SpecState:
        r, cur, pos, pend_tok, pend, tcache, dcache, out, count, done, stopped, n_acc_tot, rounds = s
        live = ~done
        dpos = lambda p: jnp.where(live, p, -1)  # noqa: E731  finished rows write nothing
        # 1. draft: [pending d_k, cur] then k-1 single tokens
        ids2 = jnp.stack([pend_tok, cur], axis=1)
        pos2 = jnp.stack([jnp.where(pend & live, pos - 1, -1), dpos(pos)], axis=1)
        dlogits, dcache = dstep(ids2, pos2, dcache)
        q1 = _dist(dlogits[:, 1].astype(jnp.float32), sampling)
        d1 = _draw(q1, keys(r + 1, 0))

        def draft_step(carry, j):
            tok, dcache = carry
            lg, dcache = dstep(tok[:, None], dpos(pos + j)[:, None], dcache)
            q = _dist(lg[:, 0].astype(jnp.float32), sampling)
            d = _draw(q, jax.vmap(jax.random.fold_in)(keys(r + 1, 1), jnp.full(B, j)))
            return (d, dcache), (d, q)

        (_, dcache), (ds, qs) = jax.lax.scan(draft_step, (d1, dcache), jnp.arange(1, k))
        drafts = jnp.concatenate([d1[:, None], ds.T], axis=1)  # [B, k]
        q = jnp.concatenate([q1[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)  # [B, k, V]
        # 2. target verifies [cur, d_1..d_k] in one pass
        tpos = jnp.where(live[:, None], pos[:, None] + jnp.arange(k + 1)[None], -1)
        tlogits, tcache = tstep(jnp.concatenate([cur[:, None], drafts], axis=1), tpos, tcache)
        V = tlogits.shape[-1]
        p = _dist(tlogits.reshape(B * (k + 1), V).astype(jnp.float32), sampling).reshape(B, k + 1, V)
        # 3. accept a prefix, add one token
        n_acc, new = accept(drafts, q, p, keys(r + 1, k))
        out = _write(out, new, count, live)
        # stop sequences ending at any newly emitted token: cut after the first one
        emitted = n_acc + 1
        hits = jnp.stack([stop_lib.ends_with_stop(out, count + j + 1, stop_packed) & (j < emitted)
                          for j in range(k + 1)], axis=1)
        hit_any = jnp.any(hits, axis=1) & live
        emitted = jnp.where(hit_any, jnp.argmax(hits, axis=1) + 1, emitted)
        new_count = jnp.where(live, count + emitted, count)
        out = jnp.where(jnp.arange(N)[None] < new_count[:, None], out, -1)
        last = jnp.take_along_axis(new, (emitted - 1)[:, None], axis=1)[:, 0]
        new_pos = jnp.where(live, pos + emitted, pos)
        new_pend = live & (n_acc == k) & ~hit_any
        # The target holds cur and the kept drafts, positions < new_pos (the last emitted token, at new_pos, is fed
        # next round); the draft holds the same except d_k when it is pending. Drop the rest (rejected drafts).
        tcache = tcache.truncate(new_pos)
        dcache = dcache.truncate(new_pos - new_pend.astype(jnp.int32))
        return SpecState(r=r + 1, cur=jnp.where(live, last, cur), pos=new_pos,
                         pend_tok=jnp.where(live, drafts[:, -1], pend_tok), pend=new_pend, tcache=tcache,
                         dcache=dcache, out=out, count=new_count, done=done | hit_any | (new_count >= max_new),
                         stopped=stopped | hit_any, n_acc=n_acc_tot + jnp.where(live, n_acc, 0),
                         rounds=rounds + live.astype(jnp.int32))

    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
    return dict(out=s.out, stopped=s.stopped, n_acc=s.n_acc, rounds=s.rounds, count=s.count, tcache=s.tcache,
                dcache=s.dcache)


def _write(out, new, count, live):
    """Row b: out[b, count[b] : count[b] + k + 1] = new[b] (only for live rows)."""
    upd = jax.vmap(lambda o, t, c: jax.lax.dynamic_update_slice(o, t, (c,)))(out, new, count)
    return jnp.where(live[:, None], upd, out)


def _max_len(prompt_T, max_new, k, limit):
    # a round started with fewer than max_new tokens emitted writes up to k positions past the last kept one
    return min(prompt_T + max_new + k + 1, limit)


def speculative_generate(target, tparams, draft, dparams, prompts, *, max_new_tokens: int, k: int = 4,
                         sampling: sampling_lib.Sampling = sampling_lib.GREEDY, seed=0, stop=None, eos_id=None,
                         lengths=None, bucket: bool = True) -> SpeculativeResult:
    """Generate with `target`, drafting k tokens per round with `draft` (decoder-only models, same vocabulary)."""
    for m, name in ((target, "target"), (draft, "draft")):
        if m.cfg.kind != "decoder":
            raise ValueError(f"speculative decoding: the {name} must be a decoder-only model, got kind "
                             f"{m.cfg.kind!r}")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"speculative decoding: draft vocab_size={draft.cfg.vocab_size} differs from target "
                         f"vocab_size={target.cfg.vocab_size}; the draft must share the target's tokenizer")
    if sampling.penalized:
        raise ValueError("speculative decoding: repetition/frequency/presence penalties are not supported "
                         "(the acceptance rule needs the distributions of all k+1 positions at once)")
    if k < 1:
        raise ValueError(f"k={k}: the draft must propose at least one token per round")
    check_options(target.cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, stop=stop, k=k)
    limit = min([m.cfg.max_seq_len for m in (target, draft) if m.cfg.position == "learned"] + [1 << 62])
    d = generation.prepare(target, prompts, lengths, max_new_tokens, None, seed, bucket)
    longest = int(d.lens.max())
    if longest + max_new_tokens + k + 1 > limit:
        raise ValueError(f"speculative decoding: prompt ({longest}) + max_new_tokens ({max_new_tokens}) + k + 1 = "
                         f"{longest + max_new_tokens + k + 1} exceeds the learned position table ({limit})")
    max_len = _max_len(d.ids.shape[1], max_new_tokens, k, limit)
    stop_items, packed = generation.stop_arg(stop, eos_id)
    run = decode.compiled(_run, target, draft, static_argnames=("k", "max_new", "max_len", "sampling"))
    res = run(tparams, dparams, d.ids, d.lens, d.live, d.seeds, packed, k=k, max_new=max_new_tokens, max_len=max_len,
              sampling=sampling)
    out, stopped, n_acc, rounds = res["out"], res["stopped"], res["n_acc"], res["rounds"]
    out = np.asarray(out)[:, :max_new_tokens]
    gen = generation.finish(out, None, stopped, d.n, stop_items)
    n_acc, rounds = np.asarray(n_acc)[: d.n].sum(), np.asarray(rounds)[: d.n].sum()
    emitted = sum(len(t) for t in gen.tokens)
    return SpeculativeResult(gen.tokens, gen.finish_reasons, None, acceptance_rate=float(n_acc / max(rounds * k, 1)),
                             tokens_per_round=float(emitted / max(rounds, 1)), rounds=int(rounds))
