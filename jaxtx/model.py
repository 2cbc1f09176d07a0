"""The jaxtx model: one Flax definition for decoder-only, encoder-only and encoder-decoder transformers.

    model = build(cfg)
    params = init_params(model, jax.random.key(0))        # a plain nested dict
    logits_BTV = model.apply({"params": params}, ids_BT)  # causal LM

Calling conventions (docs/design.md):
    decoder:          model.apply(v, input_ids, positions=None, segment_ids=None, cache=None, deterministic=True)
    encoder:          model.apply(v, input_ids, token_type_ids=None, attention_mask=None)
                      (+ method="masked_lm"/"pooled")
    encoder_decoder:  model.apply(v, input_ids, decoder_input_ids=…, attention_mask=None)  (+ method="encode"/"decode")
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtx import quant
from jaxtx.cache import AttentionContext, Cache
from jaxtx.config import ModelConfig
from jaxtx.layers.block import make_layers, run_layers
from jaxtx.layers.common import Dense, Norm, activation, constrain, dropout, dtype_of, param
from jaxtx.layers.positions import alibi_slopes, rope_cos_sin, sinusoidal, t5_bucket


def segment_positions(segment_ids_BT):
    """Positions that restart at 0 in every packed document (a new document starts where the id changes)."""
    T = segment_ids_BT.shape[1]
    idx = jnp.arange(T)[None, :]
    start = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                             segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


class Embed(nn.Module):
    """Token embedding [V, D]; `attend` is the tied output head."""

    cfg: ModelConfig
    num: int
    axes: tuple = ("vocab", "embed")
    dim: Optional[int] = None  # None = d_model

    def setup(self):
        dim = self.cfg.d_model if self.dim is None else self.dim
        self.embedding = param(self, "embedding", (self.num, dim), self.axes, self.cfg)

    def __call__(self, ids):
        return quant.take(self.embedding, ids, dtype_of(self.cfg.dtype))

    def attend(self, x_BTD):
        dt = dtype_of(self.cfg.dtype)
        return quant.einsum("BTD,VD->BTV", x_BTD, self.embedding, dt)


class LMHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        dt = dtype_of(self.cfg.dtype)
        w = param(self, "kernel", (self.cfg.d_model, self.cfg.vocab_size), ("embed", "vocab"), self.cfg)
        return quant.einsum("BTD,DV->BTV", x_BTD, w, dt)


def _context(cfg: ModelConfig, positions_BT, **kw) -> AttentionContext:
    """The attention context of one forward pass: positions and what the position scheme derives from them."""
    rope = rope_cos_sin(cfg, positions_BT) if cfg.position == "rope" else None
    alibi = jnp.asarray(alibi_slopes(cfg.n_heads)) if cfg.position == "alibi" else None
    return AttentionContext(positions=positions_BT, rope=rope, alibi=alibi, **kw)


def _padding_mask_kw(attention_mask, B, T) -> dict:
    """Key padding for a bidirectional stack: every query is in segment 1, keys in segment 1 (token) or 0 (padding)."""
    if attention_mask is None:
        return {}
    return dict(segment_ids=jnp.ones((B, T), jnp.int32), kv_segment_ids=attention_mask.astype(jnp.int32))


def _arange_positions(B, T):
    """[B, T] positions 0..T-1 in every row: a batch with no cache, no packing and no given positions."""
    return jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))


# Every model family starts the same way; these two run inside a model's setup / call (`m` is the bound module).
def _setup_embeddings(m) -> None:
    """The token table `embed` (also the tied output head) and, for learned positions, the table `pos_embed`."""
    cfg = m.cfg
    m.embed = Embed(cfg, cfg.vocab_size)
    if cfg.position == "learned":
        m.pos_embed = Embed(cfg, cfg.max_seq_len, ("pos", "embed"))


def _embed(m, ids_BT, positions_BT):
    """Token embeddings [B, T, D] plus the absolute position scheme (rope, alibi and t5 act inside attention)."""
    cfg = m.cfg
    x_BTD = m.embed(ids_BT)
    if cfg.position == "learned":
        return x_BTD + m.pos_embed(jnp.clip(positions_BT, 0, cfg.max_seq_len - 1))
    if cfg.position == "sinusoidal":
        return x_BTD + sinusoidal(positions_BT, cfg.d_model).astype(x_BTD.dtype)
    return x_BTD


def _logits(cfg: ModelConfig, x_BTD, embed: Embed, head: Optional[LMHead]):
    if cfg.tie_embeddings:
        if cfg.rescale_tied_logits:
            x_BTD = x_BTD * cfg.d_model ** -0.5
        logits = embed.attend(x_BTD)
    else:
        logits = head(x_BTD)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def _head_inputs(cfg: ModelConfig, x_BTD, embed: Embed, head: Optional[LMHead]):
    """(x [B, T, D], w, w_layout) with logits = x @ w (w [D, V], "DV") or x @ w.T (w [V, D], "VD"), for a loss that
    computes the head itself in chunks (jaxtx.train.chunked_ce); w is None when the head is quantized."""
    if cfg.tie_embeddings:
        if cfg.rescale_tied_logits:
            x_BTD = x_BTD * cfg.d_model ** -0.5
        w, layout = embed.embedding, "VD"
    else:
        w, layout = head.variables["params"]["kernel"], "DV"
    if quant.is_quantized(w):
        return x_BTD, None, layout
    return x_BTD, w.astype(dtype_of(cfg.dtype)), layout


def _select(x_BTD, logits_at_BN):
    """x at the given indices of T ([B, N, D]); all of x when None."""
    if logits_at_BN is None:
        return x_BTD
    return jnp.take_along_axis(x_BTD, logits_at_BN[:, :, None].astype(jnp.int32), axis=1)


def _check_ids(ids, name="input_ids"):
    if ids.ndim != 2:
        raise ValueError(f"{name}: expected int token ids of shape [B, T], got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {ids.dtype}")


def _check_adapter_ids(ids, B: int, T: int):
    """adapter_ids [B, T] or [B] (one adapter per row) -> [B, T] int32."""
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.shape not in ((B, T), (B,)):
        raise ValueError(f"adapter_ids: expected integer adapter slots of shape [B, T] = {[B, T]} or [B] = {[B]}, "
                         f"got {ids.dtype} {list(ids.shape)}")
    ids = ids.astype(jnp.int32)
    return jnp.broadcast_to(ids[:, None], (B, T)) if ids.ndim == 1 else ids


class DecoderLM(nn.Module):
    """Causal language model (GPT-2, Llama, Mistral, Mixtral, …)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        _setup_embeddings(self)
        self.layers = make_layers(cfg, cfg.n_layers, causal=True)
        if cfg.final_norm:
            self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg)

    def __call__(self, input_ids, positions=None, segment_ids=None, cache: Optional[Cache] = None,
                 deterministic: bool = True, logits_at=None, adapter_ids=None, head_inputs: bool = False):
        """input_ids [B, T] -> logits [B, T, V] float32; with a cache -> (logits, updated cache).

        logits_at [B, N] (optional): compute logits only at these indices of T -> [B, N, V]. Prefill needs just the
        last prompt token's, and the head is B*T*D*V FLOPs (~50 GFLOP for 8 x 128 tokens at V=32k).
        adapter_ids [B, T] or [B] int32 (optional): the LoRA adapter slot of each token (or row) when the params hold
        several adapters stacked by jaxtx.lora.stack_adapters; slot 0 is the base alone.
        head_inputs=True (no cache): return the head's inputs (x, w, w_layout) instead of logits (see _head_inputs), so
        a training loss can compute the cross-entropy chunk by chunk without the [B, T, V] logits.
        """
        cfg = self.cfg
        _check_ids(input_ids)
        B, T = input_ids.shape
        if adapter_ids is not None:
            adapter_ids = _check_adapter_ids(adapter_ids, B, T)
        if positions is None:
            if cache is not None:
                positions = cache.default_positions(T)
            elif segment_ids is not None:
                positions = segment_positions(segment_ids)
            else:
                positions = _arange_positions(B, T)
        x = _embed(self, input_ids, positions)
        x = self.perturb("embedded", x)  # zero unless a "perturbations" collection is passed: d(out)/d(embedding)
        x = dropout(cfg.dropout, x, deterministic, self)
        x = constrain(x, ("batch", "length", "embed"))
        ctx = _context(cfg, positions, segment_ids=segment_ids if cache is None else None, adapter_ids=adapter_ids)
        if cache is not None:
            cache = cache.begin(cfg, positions)
        x, cache = run_layers(self.layers, x, cache, ctx, deterministic)
        x = _select(x, logits_at)
        if cfg.final_norm:
            x = self.final_norm(x)
        if head_inputs and cache is None:
            return _head_inputs(cfg, x, self.embed, getattr(self, "lm_head", None))
        logits = _logits(cfg, x, self.embed, getattr(self, "lm_head", None))
        return logits if cache is None else (logits, cache.end())


class EncoderModel(nn.Module):
    """Bidirectional encoder (BERT): token + position + token-type embeddings, padding mask, pooler, MLM head."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        _setup_embeddings(self)
        if cfg.type_vocab_size:
            self.type_embed = Embed(cfg, cfg.type_vocab_size, ("types", "embed"))
        if cfg.embed_norm:
            self.embed_norm = Norm(cfg)
        self.layers = make_layers(cfg, cfg.n_layers, causal=False)
        if cfg.final_norm:
            self.final_norm = Norm(cfg)
        if cfg.pooler:
            self.pooler = Dense(cfg, (cfg.d_model, cfg.d_model), ("embed", "embed_out"), use_bias=True)
        if cfg.mlm_head:
            self.mlm = MlmHead(cfg)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, deterministic: bool = True):
        """input_ids [B, T] -> hidden [B, T, D]. attention_mask [B, T]: 1 = token, 0 = padding."""
        cfg = self.cfg
        _check_ids(input_ids)
        B, T = input_ids.shape
        positions = _arange_positions(B, T)
        x = _embed(self, input_ids, positions)
        if cfg.type_vocab_size:
            tt = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.type_embed(tt)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        x = self.perturb("embedded", x)
        x = dropout(cfg.dropout, x, deterministic, self)
        ctx = _context(cfg, positions, **_padding_mask_kw(attention_mask, B, T))
        x, _ = run_layers(self.layers, x, None, ctx, deterministic)
        return self.final_norm(x) if cfg.final_norm else x

    def masked_lm(self, input_ids, token_type_ids=None, attention_mask=None, deterministic: bool = True):
        """MLM logits [B, T, V] float32 (BERT head: dense -> act -> norm -> tied decoder + bias)."""
        if not self.cfg.mlm_head:
            raise ValueError("masked_lm: this config has mlm_head=false; set model.mlm_head=true")
        h = self(input_ids, token_type_ids, attention_mask, deterministic)
        return self.mlm(h, self.embed)

    def init_all(self, input_ids):
        """Touch every submodule (pooler and MLM head too) so that init creates all parameters."""
        h = self(input_ids)
        if self.cfg.pooler:
            self.pooler(h[:, 0])
        if self.cfg.mlm_head:
            self.mlm(h, self.embed)
        return h

    def pooled(self, input_ids, token_type_ids=None, attention_mask=None, deterministic: bool = True):
        """[CLS] pooler output [B, D]: tanh(dense(hidden[:, 0]))."""
        if not self.cfg.pooler:
            raise ValueError("pooled: this config has pooler=false; set model.pooler=true")
        h = self(input_ids, token_type_ids, attention_mask, deterministic)
        return jnp.tanh(self.pooler(h[:, 0]))


class MlmHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BTD, embed: Embed):
        cfg = self.cfg
        D = cfg.d_model
        transform = Dense(cfg, (D, D), ("embed", "embed_out"), use_bias=True, name="transform")
        h = activation(cfg.activation)(transform(h_BTD))
        h = Norm(cfg, name="norm")(h)
        bias = param(self, "bias", (cfg.vocab_size,), ("vocab",), cfg, nn.initializers.zeros)
        return (embed.attend(h) + bias.astype(h.dtype)).astype(jnp.float32)


class Stack(nn.Module):
    """Encoder or decoder stack of an encoder-decoder model, with its own T5 relative-position table."""

    cfg: ModelConfig
    n_layers: int
    causal: bool
    cross: bool

    def setup(self):
        cfg = self.cfg
        if cfg.position == "t5":
            self.rel_bias = Embed(cfg, cfg.t5_num_buckets, ("buckets", "heads"), dim=cfg.n_heads)
        self.layers = make_layers(cfg, self.n_layers, causal=self.causal, cross=self.cross)
        self.final_norm = Norm(cfg)

    def t5_bias(self, q_pos_BT, kv_pos_BS):
        """Relative-position bias [B, H, T, S] from bucketed (key - query) distances."""
        cfg = self.cfg
        rel = kv_pos_BS[:, None, :] - q_pos_BT[:, :, None]
        b = t5_bucket(rel, bidirectional=not self.causal, num_buckets=cfg.t5_num_buckets,
                      max_distance=cfg.t5_max_distance)
        return jnp.transpose(jnp.take(self.rel_bias.embedding, b, axis=0), (0, 3, 1, 2)).astype(jnp.float32)

    def __call__(self, x_BTD, ctx: AttentionContext, cache, deterministic):
        """cache: None, or a cache between begin() and end() (its keys' positions set the T5 bias)."""
        cfg = self.cfg
        if cfg.position == "t5":
            kv_pos = ctx.positions if cache is None else cache.kv_positions
            ctx = ctx.replace(bias=self.t5_bias(ctx.positions, kv_pos))
        x_BTD = dropout(cfg.dropout, x_BTD, deterministic, self)
        x_BTD, cache = run_layers(self.layers, x_BTD, cache, ctx, deterministic)
        x_BTD = dropout(cfg.dropout, self.final_norm(x_BTD), deterministic, self)
        return x_BTD, cache


class EncoderDecoderModel(nn.Module):
    """T5: shared embedding, bidirectional encoder, causal decoder with cross-attention."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        _setup_embeddings(self)
        self.encoder = Stack(cfg, cfg.n_layers, causal=False, cross=False)
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg)

    def encode(self, input_ids, attention_mask=None, deterministic: bool = True):
        """input_ids [B, S] -> encoder output [B, S, D]."""
        _check_ids(input_ids)
        B, S = input_ids.shape
        positions = _arange_positions(B, S)
        ctx = _context(self.cfg, positions, **_padding_mask_kw(attention_mask, B, S))
        return self.encoder(_embed(self, input_ids, positions), ctx, None, deterministic)[0]

    def decode(self, decoder_input_ids, encoded, attention_mask=None, positions=None,
               cache: Optional[Cache] = None, deterministic: bool = True, logits_at=None):
        """decoder_input_ids [B, T], encoded [B, S, D] -> logits [B, T, V] (with a cache: (logits, cache)).
        logits_at [B, N]: logits only at these indices (as DecoderLM)."""
        cfg = self.cfg
        _check_ids(decoder_input_ids, "decoder_input_ids")
        B, T = decoder_input_ids.shape
        if positions is None:
            positions = _arange_positions(B, T) if cache is None else cache.default_positions(T)
        enc_mask = jnp.ones(encoded.shape[:2], jnp.int32) if attention_mask is None else attention_mask
        ctx = _context(cfg, positions, encoded=encoded, encoded_mask=enc_mask.astype(jnp.int32))
        if cache is not None:
            cache = cache.begin(cfg, positions, encoded_len=encoded.shape[1])
        x, cache = self.decoder(_embed(self, decoder_input_ids, positions), ctx, cache, deterministic)
        logits = _logits(cfg, _select(x, logits_at), self.embed, getattr(self, "lm_head", None))
        return logits if cache is None else (logits, cache.end())

    def __call__(self, input_ids, decoder_input_ids=None, attention_mask=None, deterministic: bool = True):
        if decoder_input_ids is None:
            raise ValueError("encoder_decoder model: decoder_input_ids=[B, T] is required")
        enc = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(decoder_input_ids, enc, attention_mask, deterministic=deterministic)


def build(cfg: ModelConfig) -> nn.Module:
    """The flax module for a config."""
    return {"decoder": DecoderLM, "encoder": EncoderModel, "encoder_decoder": EncoderDecoderModel}[cfg.kind](cfg)


def dummy_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8) -> tuple:
    ids = jnp.zeros((batch, length), jnp.int32)
    return (ids, ids) if cfg.kind == "encoder_decoder" else (ids,)


def init_params(model: nn.Module, rng, *inputs) -> dict:
    """Initialize and unbox: a plain nested dict of arrays (logical axes are dropped; see abstract_params)."""
    inputs = inputs or dummy_inputs(model.cfg)
    return nn.unbox(model.init(rng, *inputs, **_init_method(model)))["params"]


def abstract_params(model: nn.Module, *inputs):
    """Boxed ShapeDtypeStructs of the params (carry logical axes for sharding), without allocating anything."""
    inputs = inputs or dummy_inputs(model.cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **_init_method(model)))["params"]


def _init_method(model) -> dict:
    return {"method": "init_all"} if model.cfg.kind == "encoder" else {}


def stack_layers(params: dict) -> dict:
    """{layers_0: t0, layers_1: t1, …} -> {layers: stacked} at every level of the tree (unrolled -> scan layout)."""
    if not isinstance(params, dict):
        return params
    out, layer_keys = {}, sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
    for k, v in params.items():
        if not k.startswith("layers_"):
            out[k] = stack_layers(v)
    if layer_keys:
        out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params[k] for k in layer_keys])
    return out


def unstack_layers(params: dict) -> dict:
    """Inverse of stack_layers (scan layout -> layers_0 … layers_{L-1})."""
    if not isinstance(params, dict):
        return params
    out = {}
    for k, v in params.items():
        if k == "layers":
            n = jax.tree.leaves(v)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda a: a[i], v)
        else:
            out[k] = unstack_layers(v)
    return out


def moe_aux_loss(intermediates: dict, cfg: ModelConfig):
    """Weighted router losses averaged over layers: aux_coef * load_balance + z_coef * z_loss (0.0 for dense)."""
    found = {"router_aux_loss": [], "router_z_loss": []}

    def visit(tree):
        if isinstance(tree, dict):
            for k, v in tree.items():
                if k in found:
                    found[k].extend(jnp.ravel(x) for x in jax.tree.leaves(v))
                else:
                    visit(v)

    visit(intermediates)
    if not found["router_aux_loss"]:
        return jnp.zeros((), jnp.float32)
    mean = lambda xs: jnp.mean(jnp.concatenate(xs))
    return cfg.router_aux_loss_coef * mean(found["router_aux_loss"]) + \
        cfg.router_z_loss_coef * mean(found["router_z_loss"])
