"""Small models shared by the inference tests (module-cached: building and compiling dominates test time).

Weights use std 0.3 so greedy decoding of a random model does not collapse into repeating one token, which would let
a wrong cache or position pass unnoticed.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtx import model as model_lib
from jaxtx.config import ModelConfig, load_model_config

SMALL = ["vocab_size=97", "d_model=32", "n_heads=4", "n_kv_heads=2", "d_ff=64", "n_layers=2", "init_std=0.3",
         "max_seq_len=128"]
FAMILIES = {
    "llama": [],
    "window": ["window=4"],
    "moe": ["num_experts=4", "experts_per_token=2", "d_ff=32"],
    "gpt2": ["position=learned", "norm=layernorm", "norm_bias=true", "activation=gelu_tanh", "gated=false",
             "qkv_bias=true", "out_bias=true", "mlp_bias=true", "n_kv_heads=4"],
}


@functools.lru_cache(maxsize=None)
def small_model(family="llama", extra=()):
    cfg = load_model_config("tiny", SMALL + FAMILIES[family] + list(extra))
    m = model_lib.build(cfg)
    return m, model_lib.init_params(m, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def full_forward(model):
    return jax.jit(lambda p, ids: model.apply({"params": p}, ids))


def naive_greedy(model, params, prompt, n):
    """Reference greedy decoding without any cache: a full causal forward over a fixed-length buffer per step (the
    buffer's tail beyond the current token cannot influence it), so one compilation serves every step."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, : len(prompt)] = prompt
    fwd = full_forward(model)
    out = []
    for t in range(len(prompt), len(prompt) + n):
        tok = int(np.argmax(np.asarray(fwd(params, jnp.asarray(buf)))[0, t - 1]))
        buf[0, t] = tok
        out.append(tok)
    return out


class MarkovLM(nn.Module):
    """A handcrafted "language model" whose next-token distribution depends only on the last token: logits =
    table[last token]. It follows the jaxtx calling convention (positions, cache) and ignores the cache, so the loops
    can be tested against closed-form sequence probabilities."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, cache=None, logits_at=None):
        V = self.cfg.vocab_size
        table = self.param("table", nn.initializers.zeros, (V, V))
        logits = table[input_ids]
        if logits_at is not None:
            logits = jnp.take_along_axis(logits, logits_at[:, :, None], axis=1)
        return logits if cache is None else (logits, cache)


def markov(table_VV):
    """(model, params) for a Markov chain with transition probabilities table_VV (rows sum to 1)."""
    V = table_VV.shape[0]
    cfg = load_model_config("tiny", ["n_layers=1", "d_model=8", "n_heads=1", "n_kv_heads=1", "d_ff=8",
                                     f"vocab_size={V}"])
    return MarkovLM(cfg), {"table": jnp.log(jnp.asarray(table_VV, jnp.float32))}
