"""Beam search on device: batch x beams in one compiled `lax.while_loop`.

Scores are summed log-probabilities; a finished hypothesis (one that ends in EOS, or the survivors at the last step)
is ranked by  sum_logprob / length ** length_penalty  with length = generated tokens including the EOS, as in
transformers. Each step expands every live beam, keeps the 2W best candidates (so W survivors exist even if W of them
end in EOS), moves EOS candidates ranked within the top W into the finished pool, and keeps the W best others alive.
A row stops once it holds W finished hypotheses and its best live beam can no longer beat the worst of them (the
transformers `early_stopping=False` heuristic), or at max_new_tokens.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx import decode
from jaxtx import sampling as sampling_lib
from jaxtx.infer import generation
from jaxtx.infer.prompts import check_options

NEG_INF = -1e30


@dataclasses.dataclass
class BeamResult:
    tokens: list  # list[list[int]]: the best hypothesis per prompt (EOS excluded)
    scores: list  # list[float]: its length-penalized score
    beams: list  # list[list[list[int]]]: all W finished hypotheses per prompt, best first
    beam_scores: list  # list[list[float]]


def _top_w_merge(scores_a, seqs_a, scores_b, seqs_b, w):
    """Top w of the union of two hypothesis sets [B, Wa], [B, Wb] (with sequences [B, W*, N])."""
    scores = jnp.concatenate([scores_a, scores_b], axis=1)
    seqs = jnp.concatenate([seqs_a, seqs_b], axis=1)
    top, idx = jax.lax.top_k(scores, w)
    return top, jnp.take_along_axis(seqs, idx[:, :, None], axis=1)


class BeamState(NamedTuple):
    i: jax.Array  # scalar int32, tokens generated so far
    logits: jax.Array  # [B*W, V] float32, next-token logits of every beam
    cache: object  # the KV cache, B*W rows (row b*W + w is beam w of prompt b)
    pos: jax.Array  # [B] int32, position the next token takes (same for all beams of a row)
    done: jax.Array  # [B] bool
    alive_logp: jax.Array  # [B, W] float32, summed log-probabilities of the live beams
    alive_seq: jax.Array  # [B, W, N] int32 live beams' tokens (-1 = not yet)
    fin_score: jax.Array  # [B, W] float32, length-penalized scores of finished hypotheses (NEG_INF = empty)
    fin_seq: jax.Array  # [B, W, N] int32


def _run(model, params, ids_BT, lens_B, eos_E, enc_ids, enc_mask, *, W, max_new, max_len, length_penalty):
    model, params = decode.decoding_layout(model, params)
    cfg = model.cfg
    B = ids_BT.shape[0]
    enc = None if enc_ids is None else decode.encode(model, params, enc_ids, enc_mask)
    step0 = decode.step_fn(model, params, enc, enc_mask)
    st = decode.prefill(step0, cfg, ids_BT, lens_B, jnp.ones(B, bool), max_new=1, max_len=max_len,
                            sampling=sampling_lib.GREEDY, want_logprobs=False)
    # every beam of a row starts from the same prefilled cache; only beam 0 is live at the first step
    rep = jnp.repeat(jnp.arange(B), W)
    cache = st.cache.take(rep)
    if enc is not None:
        enc, enc_mask = enc[rep], enc_mask[rep]
    step = decode.step_fn(model, params, enc, enc_mask)
    logits = st.logits[rep]
    alive_logp = jnp.where(jnp.arange(W)[None] == 0, 0.0, NEG_INF) * jnp.ones((B, 1))
    alive_seq = jnp.full((B, W, max_new), -1, jnp.int32)
    fin_score = jnp.full((B, W), NEG_INF)
    fin_seq = jnp.full((B, W, max_new), -1, jnp.int32)
    lp = lambda n: jnp.asarray(n, jnp.float32) ** length_penalty  # noqa: E731

    def body(s: BeamState) -> BeamState:
        i, logits, cache, pos, done, alive_logp, alive_seq, fin_score, fin_seq = s
        V = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, W, V)
        cand = (alive_logp[:, :, None] + logp).reshape(B, W * V)
        vals, idx = jax.lax.top_k(cand, 2 * W)
        beam, tok = idx // V, (idx % V).astype(jnp.int32)
        seq = jnp.take_along_axis(alive_seq, beam[:, :, None], axis=1).at[:, :, i].set(tok)  # [B, 2W, N]
        is_eos = jnp.any(tok[..., None] == eos_E, axis=-1) & (vals > NEG_INF / 2)
        rank_ok = jnp.arange(2 * W)[None] < W
        last = i + 1 >= max_new
        new_fin = jnp.where(is_eos & rank_ok & ~done[:, None], vals / lp(i + 1), NEG_INF)
        fin_score2, fin_seq2 = _top_w_merge(fin_score, fin_seq, new_fin, seq, W)
        keep_vals, keep_idx = jax.lax.top_k(jnp.where(is_eos, NEG_INF, vals), W)
        alive_logp2 = keep_vals
        alive_seq2 = jnp.take_along_axis(seq, keep_idx[:, :, None], axis=1)
        parent = jnp.take_along_axis(beam, keep_idx, axis=1)  # [B, W] which old beam each survivor extends
        tok_alive = jnp.take_along_axis(tok, keep_idx, axis=1)
        # the last step (or a full cache) turns survivors into hypotheses too (transformers' finalize)
        full = cache.is_full(pos)
        best_alive = alive_logp2[:, 0] / lp(i + 1)
        settled = (fin_score2[:, -1] > NEG_INF / 2) & (best_alive < fin_score2[:, -1])
        finalize = (last | full) & ~done & ~settled
        fin_score2, fin_seq2 = _top_w_merge(
            fin_score2, fin_seq2, jnp.where(finalize[:, None], alive_logp2 / lp(i + 1), NEG_INF), alive_seq2, W)
        # done rows keep their state frozen
        keep = done[:, None]
        fin_score2 = jnp.where(keep, fin_score, fin_score2)
        fin_seq2 = jnp.where(keep[..., None], fin_seq, fin_seq2)
        alive_logp2 = jnp.where(keep, alive_logp, alive_logp2)
        alive_seq2 = jnp.where(keep[..., None], alive_seq, alive_seq2)
        done2 = done | settled | last | full
        rows = (jnp.arange(B)[:, None] * W + parent).reshape(-1)
        cache = cache.take(rows)
        feed_pos = jnp.where(jnp.repeat(done2, W), -1, jnp.repeat(pos, W))
        logits2, cache = step(tok_alive.reshape(-1, 1), feed_pos[:, None], cache)
        return BeamState(i=i + 1, logits=logits2[:, 0].astype(jnp.float32), cache=cache, pos=pos + 1, done=done2,
                         alive_logp=alive_logp2, alive_seq=alive_seq2, fin_score=fin_score2, fin_seq=fin_seq2)

    s = BeamState(i=jnp.zeros((), jnp.int32), logits=logits, cache=cache, pos=lens_B.astype(jnp.int32),
                  done=jnp.zeros(B, bool), alive_logp=alive_logp, alive_seq=alive_seq, fin_score=fin_score,
                  fin_seq=fin_seq)
    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, s)
    return s.fin_score, s.fin_seq


def beam_search(model, params, prompts, *, num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                eos_id=None, lengths=None, max_len=None, bucket: bool = True) -> BeamResult:
    """Beam search for each prompt (token-id lists, or a padded array with lengths; the encoder input for T5)."""
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams}: must be >= 1")
    check_options(model.cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, max_len=max_len, num_beams=num_beams,
                  length_penalty=length_penalty)
    d = generation.prepare(model, prompts, lengths, max_new_tokens, max_len, 0, bucket)
    eos = np.asarray([-2] if eos_id is None else np.atleast_1d(eos_id), np.int32)  # -2 matches no token
    run = decode.compiled(_run, model, static_argnames=("W", "max_new", "max_len", "length_penalty"))
    scores, seqs = run(params, d.ids, d.lens, eos, d.enc_ids, d.enc_mask, W=num_beams, max_new=max_new_tokens,
                       max_len=d.max_len, length_penalty=float(length_penalty))
    scores, seqs = np.asarray(scores)[: d.n], np.asarray(seqs)[: d.n]
    eos_set = set(eos.tolist())
    strip = lambda r: [t for t in r.tolist() if t >= 0 and t not in eos_set]  # noqa: E731
    beams = [[strip(seqs[b, w]) for w in range(num_beams)] for b in range(d.n)]
    return BeamResult(tokens=[bm[0] for bm in beams], scores=scores[:, 0].tolist(), beams=beams,
                      beam_scores=scores.tolist())
