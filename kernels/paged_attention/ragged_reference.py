"""Ragged paged attention in plain jnp: the XLA path the engine runs on CPU, and the reference of the Pallas kernels.

The flat token axis holds whole query runs of several sequences (decode tokens and prefill chunks alike). The work is
cut into *items*: `bq` consecutive query tokens of ONE sequence. A lax loop walks the items (dynamic count), and for
each item a second loop walks that sequence's KV in chunks of `cp` pages (online softmax), from the first chunk inside
the sliding window to the chunk of the item's last query position. So the work is O(sum over sequences of
q_len x visible kv_len), memory O(N + one chunk), and no chunk past a sequence's length is read.

Why not the obvious vectorized forms (2-core dev CPU under load, H=12 K=4 Hd=64 f32, page_size 16, best of 15;
N=256 tokens of 16 sequences (14 decode + prefill chunks of 100 and 142), kv up to 1024):
  this file 27 ms | gather [W, K, S, Hd] per item + one einsum 466 ms | `lax.ragged_dot` 1964 ms
and N=16 decode tokens, kv 1000: this file 17 ms | per-token gather [N, K, S, Hd] 96 ms | ragged_dot 196 ms.
- `lax.ragged_dot`: XLA CPU lowers it to a dense dot against EVERY group with the other groups' rows masked to zero,
  i.e. O(N x R x S) work (27x a single dense dot at 16 groups, 77x at 64).
- gathers of whole page tables write hundreds of MB at engine sizes (R=64, S=2048), and read every page up to S
  however short the sequence; XLA CPU gathers are slow besides.
Items come in two classes, both static loops with dynamic trip counts: sequences with q_len == 1 (decode) use
one-row items, the rest `bq`-row items, so a decode token never pays for bq - 1 padding rows (a variant with one
class of 16-row items and no causal skip: 31 ms instead of 17 on the decode workload above).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxtx.kernels.reference import MASK_VALUE

# Query rows per prefill item and KV tokens per chunk: larger chunks mean fewer loop trips but more masked work in a
# sequence's last chunk. Measured (chunk 128/256/512/1024 tokens, rows 16/32): 256 x 16 is within 10% of the best
# on every workload above and 4x faster than 1024 on short (kv 200) decode.
PREFILL_ROWS = 16
KV_CHUNK_TOKENS = 256


def sequence_bounds(cu_q_lens, num_seqs):
    """cu_q_lens [R+1] with rows >= num_seqs collapsed to zero-length runs at cu_q_lens[num_seqs] -> (cu [R+1],
    q_lens [R]). Rows past num_seqs may hold anything; after this they own no token."""
    R = cu_q_lens.shape[0] - 1
    cu = cu_q_lens.astype(jnp.int32)
    cu = jnp.where(jnp.arange(R + 1) <= num_seqs, cu, cu[jnp.minimum(num_seqs, R)])
    return cu, cu[1:] - cu[:-1]


def _item_table(q_lens, selected, bq):
    """Items of `bq` rows over the selected sequences -> (n_items, cum [R], nb [R]); item j belongs to sequence
    searchsorted(cum, j, 'right') and is its (j - cum[r] + nb[r])-th block."""
    nb = jnp.where(selected, (q_lens + bq - 1) // bq, 0)
    cum = jnp.cumsum(nb)
    return cum[-1], cum, nb


def ragged_paged_attention_xla(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, k_scales=None,
                               v_scales=None, window=None, scale, prefill_rows=PREFILL_ROWS,
                               kv_chunk_tokens=KV_CHUNK_TOKENS):
    """q [N, H, Hd]; k/v_pages [K, P, ps, Hd]; k/v_scales [K, P, ps] f32 or None; kv_lens [R]; page_table [R, npp];
    cu_q_lens [R+1]; num_seqs scalar -> [N, H, Hd] in q.dtype (padding tokens 0). Inputs already checked."""
    N, H, Hd = q.shape
    K, _, ps, _ = k_pages.shape
    R, npp = page_table.shape
    G = H // K
    cp = max(1, min(npp, kv_chunk_tokens // ps))  # pages per KV chunk
    C = cp * ps
    n_chunks = -(-npp // cp)
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, n_chunks * cp - npp)))  # whole chunks; pad -> page 0
    kv_lens = kv_lens.astype(jnp.int32)
    cu, q_lens = sequence_bounds(cu_q_lens, num_seqs)
    quant_k, quant_v = k_scales is not None, v_scales is not None

    def run_items(out, bq, selected):
        n_items, cum, nb = _item_table(q_lens, selected, bq)
        q_pad = jnp.pad(q, ((0, bq), (0, 0), (0, 0))).reshape(N + bq, K, G, Hd)

        def item(j, out):
            r = jnp.minimum(jnp.searchsorted(cum, j, side="right"), R - 1)
            t0 = cu[r] + (j - cum[r] + nb[r]) * bq  # first token of the item
            row_ok = t0 + jnp.arange(bq) < cu[r + 1]  # [bq] rows inside this sequence
            q_pos = kv_lens[r] - q_lens[r] + (t0 - cu[r]) + jnp.arange(bq)  # [bq] absolute positions
            last = jnp.minimum(t0 + bq, cu[r + 1]) - 1 - t0
            hi = jnp.minimum((q_pos[last] + C) // C, n_chunks)  # chunks up to the last query's position (causal skip)
            lo = 0 if window is None else jnp.maximum(0, q_pos[0] - window + 1) // C
            q_blk = lax.dynamic_slice_in_dim(q_pad, t0, bq)  # [bq, K, G, Hd]

            def chunk(c, carry):
                m, l, acc = carry  # [K, G, bq], [K, G, bq], [K, G, bq, Hd] f32
                pages = lax.dynamic_slice_in_dim(table[r], c * cp, cp)  # [cp]
                k = jnp.take(k_pages, pages, axis=1).reshape(K, C, Hd)
                v = jnp.take(v_pages, pages, axis=1).reshape(K, C, Hd)
                if quant_k:
                    k = k.astype(q.dtype)
                s = jnp.einsum("tkgh,kch->kgtc", q_blk, k, preferred_element_type=jnp.float32) * scale
                if quant_k:
                    s = s * jnp.take(k_scales, pages, axis=1).reshape(K, 1, 1, C)
                kv_pos = c * C + jnp.arange(C)
                # slots past the sequence's length hold stale data of another request (maybe NaN): 0 * NaN is NaN,
                # so they are zeroed, not only given probability 0
                kv_ok = kv_pos < kv_lens[r]
                v = jnp.where(kv_ok[None, :, None], v, jnp.zeros_like(v))
                mask = (kv_pos[None, :] <= q_pos[:, None]) & row_ok[:, None] & kv_ok[None, :]  # [bq, C]
                if window is not None:
                    mask = mask & (q_pos[:, None] - kv_pos[None, :] < window)
                s = jnp.where(mask, s, MASK_VALUE)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                l = alpha * l + p.sum(-1)
                if quant_v:
                    vs = jnp.take(v_scales, pages, axis=1).reshape(K, 1, 1, C)
                    p = p * jnp.where(kv_ok, vs, 0.0)
                    v = v.astype(q.dtype)
                pv = jnp.einsum("kgtc,kch->kgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
                return m_new, l, alpha[..., None] * acc + pv

            init = (jnp.full((K, G, bq), MASK_VALUE, jnp.float32), jnp.zeros((K, G, bq), jnp.float32),
                    jnp.zeros((K, G, bq, Hd), jnp.float32))
            _, l, acc = lax.fori_loop(lo, jnp.maximum(lo, hi), chunk, init)
            o = (acc / jnp.where(l > 0.0, l, 1.0)[..., None]).transpose(2, 0, 1, 3).astype(q.dtype)  # [bq, K, G, Hd]
            # rows past the sequence's end belong to the next sequence (maybe written by the other item class):
            # keep what is there
            old = lax.dynamic_slice_in_dim(out, t0, bq)
            return lax.dynamic_update_slice_in_dim(out, jnp.where(row_ok[:, None, None, None], o, old), t0, 0)

        return lax.fori_loop(0, n_items, item, out)

    out = jnp.zeros((N + prefill_rows, K, G, Hd), q.dtype)  # padding tokens stay 0; + rows so slices never clamp
    out = run_items(out, 1, q_lens == 1)  # decode tokens: one row per item
    out = run_items(out, prefill_rows, q_lens > 1)  # prefill chunks (and multi-token verify)
    return out[:N].reshape(N, H, Hd)
