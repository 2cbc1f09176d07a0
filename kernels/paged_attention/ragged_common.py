"""What both Pallas ragged kernels share: block sizes, and the *item plan* that turns the ragged token axis into
fixed-size work items.

An item is up to `q_tokens` consecutive query tokens of ONE sequence. Sequence r (q_len tokens) owns
ceil(q_len / q_tokens) items, so the items of a step number at most W = min(N, N // q_tokens + R): the kernels' grid
is static (W, K, ...) and programs past the live item count see zero rows and skip all work. The wrapper gathers each
item's queries into rows t * G + g of its kv head (GQA without repeating K/V: one K/V page read serves G heads) and
scatters the rows back to tokens; padding tokens get 0. Each token belongs to exactly one item, so no two programs
write the same token and no cross-program softmax merge is needed.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxtx.kernels.paged_attention.ragged_reference import sequence_bounds


@dataclasses.dataclass(frozen=True)
class RaggedBlockSizes:
    """q_tokens: query tokens per item (rows = q_tokens * G, padded for the hardware tile). kv_tokens: KV tokens per
    inner step of the GPU kernel (whole pages; the TPU kernel steps one page at a time, its DMA unit)."""
    q_tokens: int = 16
    kv_tokens: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0 or val & (val - 1):
                raise ValueError(f"RaggedBlockSizes.{f.name}={val!r}: expected a positive power of two")


@dataclasses.dataclass(frozen=True)
class ItemPlan:
    """Per item w (arrays [W]): meta [W, 4] int32 = (kv_len, position of its first query, live rows, 0);
    tables [W, npp] its sequence's page table. token_item / token_row [N] place each token; token_ok [N]."""
    meta: jnp.ndarray
    tables: jnp.ndarray
    t0: jnp.ndarray
    token_item: jnp.ndarray
    token_row: jnp.ndarray
    token_ok: jnp.ndarray


def num_items(N: int, R: int, bq: int) -> int:
    """Static bound on sum_r ceil(q_len_r / bq) given sum_r q_len_r <= N."""
    return max(1, min(N, N // bq + R))


def plan_items(N, kv_lens, page_table, cu_q_lens, num_seqs, bq) -> ItemPlan:
    R = page_table.shape[0]
    W = num_items(N, R, bq)
    cu, q_lens = sequence_bounds(cu_q_lens, num_seqs)
    nb = (q_lens + bq - 1) // bq
    cum = jnp.cumsum(nb)
    j = jnp.arange(W, dtype=jnp.int32)
    r = jnp.minimum(jnp.searchsorted(cum, j, side="right"), R - 1)
    blk = j - cum[r] + nb[r]
    t0 = cu[r] + blk * bq
    rows = jnp.where(j < cum[-1], jnp.clip(cu[r + 1] - t0, 0, bq), 0)
    pos0 = kv_lens[r] - q_lens[r] + blk * bq
    meta = jnp.stack([kv_lens[r], pos0, rows, jnp.zeros_like(rows)], axis=1).astype(jnp.int32)
    n = jnp.arange(N, dtype=jnp.int32)
    rn = jnp.minimum(jnp.searchsorted(cu[1:], n, side="right"), R - 1)
    off = n - cu[rn]
    return ItemPlan(meta=meta, tables=page_table[r], t0=t0, token_item=cum[rn] - nb[rn] + off // bq,
                    token_row=off % bq, token_ok=n < cu[R])


def to_items(q, plan: ItemPlan, K: int, bq: int, rows_padded: int):
    """q [N, H, Hd] -> [W, K, rows_padded, Hd] with row t * G + g = token t0 + t, head (kv head, g)."""
    N, H, Hd = q.shape
    G = H // K
    W = plan.t0.shape[0]
    tok = jnp.minimum(plan.t0[:, None] + jnp.arange(bq)[None, :], N - 1)  # rows past the item: any finite query
    q_items = q.reshape(N, K, G, Hd)[tok]  # [W, bq, K, G, Hd]
    q_items = q_items.transpose(0, 2, 1, 3, 4).reshape(W, K, bq * G, Hd)
    return jnp.pad(q_items, ((0, 0), (0, 0), (0, rows_padded - bq * G), (0, 0)))


def from_items(o_items, plan: ItemPlan, N: int, H: int, bq: int):
    """[W, K, rows_padded, Hd] -> [N, H, Hd]; padding tokens 0."""
    W, K, _, Hd = o_items.shape
    G = H // K
    o = o_items[:, :, :bq * G].reshape(W, K, bq, G, Hd)
    o = o[plan.token_item, :, plan.token_row]  # [N, K, G, Hd]
    return jnp.where(plan.token_ok[:, None, None, None], o, 0).reshape(N, H, Hd).astype(o_items.dtype)
