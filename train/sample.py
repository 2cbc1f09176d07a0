"""How a trained model is prompted: the run's PromptLayout, and greedy samples at the end of training (and in the
learning-proof test).

The samples run core's static-cache decode loop (`jaxtx.decode`, prefill then one compiled while loop of KV-cached
steps), the loop `jaxtx generate` runs: on the same run dir and prompts they give the same tokens (tested).
"""
from __future__ import annotations

import numpy as np

from jaxtx import decode
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


def greedy_generate(model, params, prompts: list[list[int]], n_new: int, eos_id: int | None = None) -> list[list[int]]:
    """Greedy continuations (new tokens only, up to n_new; a row ends at EOS, which is left out) of each prompt,
    batched and bucketed as `jaxtx.infer.generate` batches them. Prompts must fit max_seq_len - 1."""
    toks, _, _ = decode.generate_rows(model, params, [np.asarray(p, np.int64) for p in prompts], max_new=n_new,
                                      stop_items=[] if eos_id is None else [int(eos_id)])
    return toks
