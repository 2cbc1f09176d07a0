"""A one-layer attention LM that speaks the engine's paged-cache contract (cache.with_step / slot_mapping /
page_table / kv_lens / cu_q_lens), so the engine's scheduling, paging and sampling can be tested against a plain
full-sequence forward of the same weights, independently of the production paged cache.

Attention reads every page in the sequence's page table and masks by position (and window), with masked values
replaced by 0 before they touch the softmax or V, like a NaN-safe kernel: a garbage-filled pool must not matter.
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ToyCfg:
    vocab_size: int = 61
    d: int = 32
    window: Optional[int] = None
    max_seq_len: int = 512
    kind: str = "decoder"
    position: str = "learned"


@flax.struct.dataclass
class ToyPagedCache:
    k: jax.Array  # [P, ps, D]
    v: jax.Array
    slot_mapping: Optional[jax.Array] = None
    page_table: Optional[jax.Array] = None
    kv_lens: Optional[jax.Array] = None
    cu_q_lens: Optional[jax.Array] = None
    num_seqs: Optional[jax.Array] = None

    @classmethod
    def init(cls, cfg, num_pages, page_size):
        z = lambda: jnp.zeros((num_pages, page_size, cfg.d), jnp.float32)  # two buffers: both are donated
        return cls(z(), z())

    def with_step(self, slot_mapping, page_table, kv_lens, cu_q_lens, num_seqs):
        return self.replace(slot_mapping=slot_mapping, page_table=page_table, kv_lens=kv_lens, cu_q_lens=cu_q_lens,
                            num_seqs=num_seqs)

    def without_step(self):
        return ToyPagedCache(self.k, self.v)


class ToyLM(nn.Module):
    cfg: ToyCfg

    @nn.compact
    def __call__(self, ids_BT, positions=None, cache=None, logits_at=None):
        cfg = self.cfg
        B, T = ids_BT.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
        init = nn.initializers.normal(0.5)
        x = self.param("emb", init, (cfg.vocab_size, cfg.d))[ids_BT]
        x = x + self.param("pos", init, (cfg.max_seq_len, cfg.d))[jnp.clip(positions, 0, cfg.max_seq_len - 1)]
        q, k, v = (x @ self.param(n, init, (cfg.d, cfg.d)) for n in ("wq", "wk", "wv"))
        if cache is None:
            kp, vp, qpos = k, v, positions  # [B, S=T, D]
            kvpos = jnp.broadcast_to(positions[:, None, :], (B, T, T))
        else:  # B == 1: the flat token axis
            P, ps, D = cache.k.shape
            flat = cache.slot_mapping
            idx = jnp.where(flat >= 0, flat, P * ps)
            kf = cache.k.reshape(P * ps, D).at[idx].set(k[0], mode="drop")
            vf = cache.v.reshape(P * ps, D).at[idx].set(v[0], mode="drop")
            cache = cache.replace(k=kf.reshape(P, ps, D), v=vf.reshape(P, ps, D))
            n = jnp.arange(T)
            seq = jnp.clip(jnp.searchsorted(cache.cu_q_lens[1:], n, side="right"), 0, cache.page_table.shape[0] - 1)
            pt = cache.page_table[seq]  # [T, W]
            W = pt.shape[1]
            kp = cache.k[pt].reshape(1, T, W * ps, D)[0]  # per query token: its sequence's pages
            vp = cache.v[pt].reshape(1, T, W * ps, D)[0]
            qpos = positions
            kvpos = jnp.broadcast_to(jnp.arange(W * ps)[None, :], (T, W * ps))[None]
            kvpos = jnp.where(kvpos < cache.kv_lens[seq][None, :, None], kvpos, -1)
            kp, vp = kp[None], vp[None]
        if cache is None:
            s = jnp.einsum("btd,bsd->bts", q, kp)
        else:
            s = jnp.einsum("btd,btsd->bts", q, kp)
        mask = (kvpos >= 0) & (kvpos <= qpos[:, :, None])
        if cfg.window is not None:
            mask &= qpos[:, :, None] - kvpos < cfg.window
        s = jnp.where(mask, s / cfg.d ** 0.5, -1e30)
        p = jax.nn.softmax(s, axis=-1)
        p = jnp.where(mask, p, 0.0)
        if cache is None:
            o = jnp.einsum("bts,bsd->btd", p, vp)
        else:
            o = jnp.einsum("bts,btsd->btd", p, jnp.where(mask[..., None], vp, 0.0))
        x = x + o @ self.param("wo", init, (cfg.d, cfg.d))
        logits = jnp.tanh(x) @ self.param("head", init, (cfg.d, cfg.vocab_size))
        if logits_at is not None:
            logits = jnp.take_along_axis(logits, logits_at[:, :, None], axis=1)
        return logits if cache is None else (logits, cache)


def toy(window=None, vocab_size=61):
    cfg = ToyCfg(vocab_size=vocab_size, window=window)
    m = ToyLM(cfg)
    return m, m.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
