"""Which HF tensor becomes which jaxtx param, and how (reshape / transpose / split / stack), per family.

A spec is a list of `Entry`: HF names with their expected shapes, jaxtx param paths, and a pair of exact inverse
functions between the two lists of arrays (pure transposes and reshapes, so a round trip is bit-exact). jaxtx paths
are tuples; a layer's params carry their layer index right after "layers", e.g. ("layers", 3, "attn", "q", "kernel"),
and `jaxtx.hf` stacks them (scan_layers) or names them "layers_3".

HF names are the canonical ones of the *ForCausalLM / *ForConditionalGeneration / BertForMaskedLM classes; files
saved from a headless base model (no "model." / "transformer." / "bert." prefix) are renamed to these on load.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from jaxtx.config import ModelConfig
from jaxtx.hf.config import family_of


@dataclasses.dataclass
class Entry:
    hf: list[str]
    shapes: list[tuple[int, ...]]
    jax: list[tuple]
    fwd: Callable[[list[np.ndarray]], list[np.ndarray]]  # HF arrays -> jaxtx arrays
    inv: Callable[[list[np.ndarray]], list[np.ndarray]]  # jaxtx arrays -> HF arrays


def _one(hf, shape, path, fwd=lambda a: a, inv=lambda a: a) -> Entry:
    return Entry([hf], [tuple(shape)], [path], lambda xs: [fwd(xs[0])], lambda xs: [inv(xs[0])])


def _T(a):
    return a.T


def linear(hf, n_in, n_out, path, bias, *, conv1d=False, w="weight", b="bias") -> list[Entry]:
    """nn.Linear weight [out, in] (or GPT-2 Conv1D [in, out]) -> kernel [in, out]; bias [out]."""
    es = [_one(f"{hf}.{w}", (n_in, n_out), path + ("kernel",)) if conv1d
          else _one(f"{hf}.{w}", (n_out, n_in), path + ("kernel",), _T, _T)]
    return es + ([_one(f"{hf}.{b}", (n_out,), path + ("bias",))] if bias else [])


def heads_in(hf, D, n, Hd, path, bias) -> list[Entry]:
    """q/k/v projection: weight [n*Hd, D] -> kernel [D, n, Hd]; bias [n*Hd] -> [n, Hd]."""
    es = [_one(f"{hf}.weight", (n * Hd, D), path + ("kernel",), lambda a: a.T.reshape(D, n, Hd),
               lambda k: k.reshape(D, n * Hd).T)]
    if bias:
        es.append(_one(f"{hf}.bias", (n * Hd,), path + ("bias",), lambda a: a.reshape(n, Hd),
                       lambda k: k.reshape(n * Hd)))
    return es


def heads_out(hf, D, H, Hd, path, bias, *, conv1d=False) -> list[Entry]:
    """Output projection: weight [D, H*Hd] (Conv1D: [H*Hd, D]) -> kernel [H, Hd, D]; bias [D]."""
    if conv1d:
        es = [_one(f"{hf}.weight", (H * Hd, D), path + ("kernel",), lambda a: a.reshape(H, Hd, D),
                   lambda k: k.reshape(H * Hd, D))]
    else:
        es = [_one(f"{hf}.weight", (D, H * Hd), path + ("kernel",), lambda a: a.T.reshape(H, Hd, D),
                   lambda k: k.reshape(H * Hd, D).T)]
    return es + ([_one(f"{hf}.bias", (D,), path + ("bias",))] if bias else [])


def norm(hf, D, path, bias, *, w="weight", b="bias") -> list[Entry]:
    return [_one(f"{hf}.{w}", (D,), path + ("scale",))] + ([_one(f"{hf}.{b}", (D,), path + ("bias",))] if bias else [])


# ------------------------------------------------------------------------------------------------ families
def _rope_family(cfg: ModelConfig) -> list[Entry]:
    D, H, K, Hd, F, V, E = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.d_ff, cfg.vocab_size, cfg.num_experts
    es = [_one("model.embed_tokens.weight", (V, D), ("embed", "embedding"))]
    for i in range(cfg.n_layers):
        p, j = f"model.layers.{i}.", ("layers", i)
        es += norm(p + "input_layernorm", D, j + ("attn_norm",), False)
        es += heads_in(p + "self_attn.q_proj", D, H, Hd, j + ("attn", "q"), cfg.qkv_bias)
        es += heads_in(p + "self_attn.k_proj", D, K, Hd, j + ("attn", "k"), cfg.qkv_bias)
        es += heads_in(p + "self_attn.v_proj", D, K, Hd, j + ("attn", "v"), cfg.qkv_bias)
        es += heads_out(p + "self_attn.o_proj", D, H, Hd, j + ("attn", "o"), cfg.out_bias)
        es += norm(p + "post_attention_layernorm", D, j + ("mlp_norm",), False)
        if cfg.is_moe:
            m = p + "block_sparse_moe."
            es += [_one(m + "gate.weight", (E, D), j + ("moe", "router"), _T, _T)]
            for w, name, shape in (("w1", "wi_gate", (F, D)), ("w3", "wi_up", (F, D)), ("w2", "wo", (D, F))):
                es.append(Entry([f"{m}experts.{e}.{w}.weight" for e in range(E)], [shape] * E,
                                [j + ("moe", name)], lambda xs: [np.stack([x.T for x in xs])],
                                lambda ys: [y.T for y in ys[0]]))
        else:
            es += linear(p + "mlp.gate_proj", D, F, j + ("mlp", "wi_gate"), cfg.mlp_bias)
            es += linear(p + "mlp.up_proj", D, F, j + ("mlp", "wi_up"), cfg.mlp_bias)
            es += linear(p + "mlp.down_proj", F, D, j + ("mlp", "wo"), cfg.mlp_bias)
    es += norm("model.norm", D, ("final_norm",), False)
    if not cfg.tie_embeddings:
        es += [_one("lm_head.weight", (V, D), ("lm_head", "kernel"), _T, _T)]
    return es


def _gpt2(cfg: ModelConfig) -> list[Entry]:
    D, H, Hd, F, V = cfg.d_model, cfg.n_heads, cfg.hd, cfg.d_ff, cfg.vocab_size
    es = [_one("transformer.wte.weight", (V, D), ("embed", "embedding")),
          _one("transformer.wpe.weight", (cfg.max_seq_len, D), ("pos_embed", "embedding"))]
    for i in range(cfg.n_layers):
        p, j = f"transformer.h.{i}.", ("layers", i)
        a = j + ("attn",)
        es += norm(p + "ln_1", D, j + ("attn_norm",), True)
        # fused Conv1D c_attn: weight [D, 3D] = [q | k | v] columns, bias [3D]
        es.append(Entry([p + "attn.c_attn.weight"], [(D, 3 * D)], [a + (n, "kernel") for n in "qkv"],
                        lambda xs: [w.reshape(D, H, Hd) for w in np.split(xs[0], 3, axis=1)],
                        lambda ys: [np.concatenate([y.reshape(D, D) for y in ys], axis=1)]))
        es.append(Entry([p + "attn.c_attn.bias"], [(3 * D,)], [a + (n, "bias") for n in "qkv"],
                        lambda xs: [b.reshape(H, Hd) for b in np.split(xs[0], 3)],
                        lambda ys: [np.concatenate([y.reshape(D) for y in ys])]))
        es += heads_out(p + "attn.c_proj", D, H, Hd, a + ("o",), True, conv1d=True)
        es += norm(p + "ln_2", D, j + ("mlp_norm",), True)
        es += linear(p + "mlp.c_fc", D, F, j + ("mlp", "wi"), True, conv1d=True)
        es += linear(p + "mlp.c_proj", F, D, j + ("mlp", "wo"), True, conv1d=True)
    return es + norm("transformer.ln_f", D, ("final_norm",), True)


def _bert(cfg: ModelConfig) -> list[Entry]:
    D, H, Hd, F, V = cfg.d_model, cfg.n_heads, cfg.hd, cfg.d_ff, cfg.vocab_size
    b = "bert."
    es = [_one(b + "embeddings.word_embeddings.weight", (V, D), ("embed", "embedding")),
          _one(b + "embeddings.position_embeddings.weight", (cfg.max_seq_len, D), ("pos_embed", "embedding")),
          _one(b + "embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, D), ("type_embed", "embedding"))]
    es += norm(b + "embeddings.LayerNorm", D, ("embed_norm",), True)
    for i in range(cfg.n_layers):
        p, j = f"{b}encoder.layer.{i}.", ("layers", i)
        for hf, n in (("query", "q"), ("key", "k"), ("value", "v")):
            es += heads_in(f"{p}attention.self.{hf}", D, H, Hd, j + ("attn", n), True)
        es += heads_out(p + "attention.output.dense", D, H, Hd, j + ("attn", "o"), True)
        es += norm(p + "attention.output.LayerNorm", D, j + ("attn_norm",), True)
        es += linear(p + "intermediate.dense", D, F, j + ("mlp", "wi"), True)
        es += linear(p + "output.dense", F, D, j + ("mlp", "wo"), True)
        es += norm(p + "output.LayerNorm", D, j + ("mlp_norm",), True)
    if cfg.pooler:
        es += linear(b + "pooler.dense", D, D, ("pooler",), True)
    if cfg.mlm_head:
        es += linear("cls.predictions.transform.dense", D, D, ("mlm", "transform"), True)
        es += norm("cls.predictions.transform.LayerNorm", D, ("mlm", "norm"), True)
        es += [_one("cls.predictions.bias", (V,), ("mlm", "bias"))]
    return es


def _t5(cfg: ModelConfig) -> list[Entry]:
    D, H, Hd, F, V = cfg.d_model, cfg.n_heads, cfg.hd, cfg.d_ff, cfg.vocab_size
    es = [_one("shared.weight", (V, D), ("embed", "embedding"))]

    def attn(hf, path):
        return [e for n in "qkv" for e in heads_in(f"{hf}.{n}", D, H, Hd, path + (n,), False)] \
            + heads_out(f"{hf}.o", D, H, Hd, path + ("o",), False)

    def ffn(hf, path):
        if cfg.gated:
            return linear(hf + ".wi_0", D, F, path + ("wi_gate",), False) \
                + linear(hf + ".wi_1", D, F, path + ("wi_up",), False) + linear(hf + ".wo", F, D, path + ("wo",), False)
        return linear(hf + ".wi", D, F, path + ("wi",), False) + linear(hf + ".wo", F, D, path + ("wo",), False)

    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        es.append(_one(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       (cfg.t5_num_buckets, H), (stack, "rel_bias", "embedding")))
        for i in range(n_layers):
            p, j = f"{stack}.block.{i}.layer.", (stack, "layers", i)
            es += norm(p + "0.layer_norm", D, j + ("attn_norm",), False) + attn(p + "0.SelfAttention", j + ("attn",))
            k = 1
            if stack == "decoder":
                es += norm(p + "1.layer_norm", D, j + ("cross_norm",), False)
                es += attn(p + "1.EncDecAttention", j + ("cross_attn",))
                k = 2
            es += norm(f"{p}{k}.layer_norm", D, j + ("mlp_norm",), False) + ffn(f"{p}{k}.DenseReluDense", j + ("mlp",))
        es += norm(f"{stack}.final_layer_norm", D, (stack, "final_norm"), False)
    if not cfg.tie_embeddings:
        es += [_one("lm_head.weight", (V, D), ("lm_head", "kernel"), _T, _T)]
    return es


def spec(cfg: ModelConfig) -> list[Entry]:
    fam = family_of(cfg)
    return {"llama": _rope_family, "mistral": _rope_family, "mixtral": _rope_family, "gpt2": _gpt2, "bert": _bert,
            "t5": _t5}[fam](cfg)


# ------------------------------------------------------------------------------------------------ naming quirks
# Body prefix of the canonical (with-head) class, the embedding that proves a file uses it, and the head names that
# never carry it.
PREFIX = {"llama": ("model.", "embed_tokens.weight", ("lm_head.",)),
          "mistral": ("model.", "embed_tokens.weight", ("lm_head.",)),
          "mixtral": ("model.", "embed_tokens.weight", ("lm_head.",)),
          "gpt2": ("transformer.", "wte.weight", ("lm_head.",)),
          "bert": ("bert.", "embeddings.word_embeddings.weight", ("cls.",)),
          "t5": ("", "shared.weight", ())}

# Tensors HF files carry that jaxtx does not need: buffers, heads jaxtx has no use for, tied aliases.
IGNORED = {"llama": [r".*rotary_emb\.inv_freq"], "mistral": [r".*rotary_emb\.inv_freq"],
           "mixtral": [r".*rotary_emb\.inv_freq"],
           "gpt2": [r".*\.attn\.(masked_)?bias"],
           "bert": [r"bert\.embeddings\.position_ids", r"cls\.seq_relationship\..*",
                    r"cls\.predictions\.decoder\.bias"],
           "t5": [r"(encoder|decoder)\.embed_tokens\.weight",
                  r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]}

# The output head that a tied checkpoint may still store (equal to the embedding), per family.
TIED_HEAD = {"llama": "lm_head.weight", "mistral": "lm_head.weight", "mixtral": "lm_head.weight",
             "gpt2": "lm_head.weight", "bert": "cls.predictions.decoder.weight", "t5": "lm_head.weight"}
EMBED = {"llama": "model.embed_tokens.weight", "mistral": "model.embed_tokens.weight",
         "mixtral": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight",
         "bert": "bert.embeddings.word_embeddings.weight", "t5": "shared.weight"}


def canonical_names(family: str, names: list[str]) -> dict[str, str]:
    """canonical HF name -> name in the file (adds a missing body prefix, BERT's old gamma/beta spelling)."""
    prefix, probe, heads = PREFIX[family]
    add = prefix and probe in names and prefix + probe not in names
    out = {}
    for n in names:
        c = prefix + n if add and not n.startswith(heads) else n
        if family == "bert":
            c = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", c))
        out[c] = n
    return out


def is_ignored(family: str, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in IGNORED[family])
