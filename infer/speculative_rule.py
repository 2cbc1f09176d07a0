"""The speculative-sampling acceptance rule (Leviathan et al. 2023; Chen et al. 2023), as a pure function.

Draft token d_i drawn from q_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the
replacement is drawn from norm(max(0, p_i - q_i)); if all k are kept a bonus token is drawn from p_{k+1}. The emitted
tokens are then distributed exactly as sampling from the target p alone.

With greedy settings p and q are one-hot, the ratio is 0 or 1 and the residual is one-hot at the target's argmax, so
the same code emits exactly the target's greedy tokens (u is drawn in [0, 1), so ratio 1 always accepts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def accept(draft_BK, q_BKV, p_BK1V, key_B):
    """draft_BK int32: proposed tokens; q_BKV: the draft distributions they were drawn from; p_BK1V: the target's
    distributions at the same k positions plus the one after; key_B: one PRNG key per row.

    Returns (n_accepted_B int32 in [0, k], tokens_BK1 int32: the accepted drafts, then the correction / bonus token,
    then -1 padding). Row b emits n_accepted_B[b] + 1 tokens.
    """
    B, K = draft_BK.shape
    k_u, k_res = jax.vmap(lambda k: jax.random.split(k, 2))(key_B).swapaxes(0, 1)
    u_BK = jax.vmap(lambda k: jax.random.uniform(k, (K,)))(k_u)
    p_d = jnp.take_along_axis(p_BK1V[:, :K], draft_BK[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q_BKV, draft_BK[..., None], axis=-1)[..., 0]
    # u < p/q written without the division so q_d == 0 (a token the draft could not have drawn) never gives NaN
    ok_BK = u_BK * q_d < p_d
    n_acc = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)  # length of the accepted prefix

    p_at = jnp.take_along_axis(p_BK1V, n_acc[:, None, None], axis=1)[:, 0]  # [B, V]
    q_pad = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], axis=1)  # q_{k+1} = 0: the bonus draws from p
    q_at = jnp.take_along_axis(q_pad, n_acc[:, None, None], axis=1)[:, 0]
    resid = jnp.maximum(p_at - q_at, 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    # p == q up to rounding leaves no residual mass; the rule then never rejects, so p itself is the right fallback
    resid = jnp.where(mass > 1e-12, resid, p_at)
    nxt = jax.vmap(jax.random.categorical)(k_res, jnp.log(jnp.maximum(resid, 1e-38)) + jnp.where(resid > 0, 0.0, -1e30))

    i = jnp.arange(K + 1)[None, :]
    drafts = jnp.concatenate([draft_BK, jnp.zeros_like(draft_BK[:, :1])], axis=1)
    tokens = jnp.where(i < n_acc[:, None], drafts, jnp.where(i == n_acc[:, None], nxt[:, None], -1))
    return n_acc.astype(jnp.int32), tokens.astype(jnp.int32)
