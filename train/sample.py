"""How a trained model is prompted: the run's PromptLayout, and greedy samples at the end of training (and in the
learning-proof test).

Uses jaxtx.infer.generate when it exists; until then a jitted loop that re-runs the full forward on a fixed-size
buffer each step (O(T^2) work, fine for a few short samples; causal attention makes the unwritten tail irrelevant).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx.run_dir import PromptLayout


def training_prompt_layout(objective: str, eos_id: int) -> PromptLayout:
    """The ids around a user's text in the model's own context, as train/packing.py lays rows out per objective
    (recorded in the run dir; `jaxtx generate --run` and the end-of-run samples prompt with it):
    - causal: pack_documents lays documents end to end, each followed by EOS, but segment ids restart attention and
      positions at every document's first token, so a document's context starts at that token: nothing before it.
      (The EOS that ends the previous document is in the previous segment; the model never sees it before a text.)
    - sft, dpo: prompt_response_rows starts every row with the prompt's own ids: nothing before, and the response
      follows the prompt directly.
    - mlm: chunk_documents cuts raw ids, no [CLS]/[SEP].
    - span: the encoder input ends with EOS (span_corrupt), so an encoder prompt gets EOS after it."""
    if objective == "span":
        return PromptLayout(suffix=(int(eos_id),))
    return PromptLayout()


def context_before_response(rows: dict, i: int) -> list[int]:
    """The ids row i of prompt_response_rows gives the model before its response: the row's first segment up to the
    first loss-counted position."""
    toks, seg, mask = rows["tokens"][i], rows["segment_ids"][i], rows["loss_mask"][i]
    n = int(((seg == seg[0]) & (np.cumsum(mask) == 0)).sum())
    return [int(x) for x in toks[:max(1, n)]]


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
