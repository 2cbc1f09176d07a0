"""The sampler lives in core, `jaxtx.sampling` (the static-cache decode loop in `jaxtx.decode` and train's end-of-run
samples use it too); this module keeps the name infer's callers (engine, server, CLI) import it by."""
from jaxtx.sampling import (GREEDY, NEG, Sampling, apply_penalties, init_penalty_state, min_p_filter, probs,
                            process_logits, row_keys, sample, token_logprobs, top_k_filter, top_p_filter,
                            update_penalty_state)

__all__ = ["GREEDY", "NEG", "Sampling", "apply_penalties", "init_penalty_state", "min_p_filter", "probs",
           "process_logits", "row_keys", "sample", "token_logprobs", "top_k_filter", "top_p_filter",
           "update_penalty_state"]
