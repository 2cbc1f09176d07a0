"""Greedy samples from a decoder at the end of training (and in the learning-proof test).

Uses jaxtx.infer.generate when it exists; until then a jitted loop that re-runs the full forward on a fixed-size
buffer each step (O(T^2) work, fine for a few short samples; causal attention makes the unwritten tail irrelevant).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnames=("model", "n_new"))
def _greedy(model, params, buf_BT, lengths_B, n_new: int):
    def body(k, buf):
        logits = model.apply({"params": params}, buf)  # [B, T, V]
        cur = lengths_B + k  # the slot to fill
        nxt = jnp.argmax(jnp.take_along_axis(logits, (cur - 1)[:, None, None], axis=1)[:, 0], axis=-1)
        return buf.at[jnp.arange(buf.shape[0]), cur].set(nxt.astype(buf.dtype))
    return jax.lax.fori_loop(0, n_new, body, buf_BT)


def greedy_generate(model, params, prompts: list[list[int]], n_new: int, eos_id: int | None = None) -> list[list[int]]:
    """Greedy continuations (new tokens only, cut after EOS) of each prompt."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = int(lengths.max()) + n_new
    T = -(-T // 8) * 8  # a few fixed buffer sizes -> fewer recompiles
    buf = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    out = np.asarray(_greedy(model, params, jnp.asarray(buf), jnp.asarray(lengths), n_new))
    res = []
    for i, L in enumerate(lengths):
        new = out[i, L:L + n_new].tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        res.append(new)
    return res
