"""Build the tiny Hugging Face reference checkpoints that tests/jaxtx/test_hf.py compares jaxtx against.

Needs torch + transformers (`pip install -e .[hf]`); CI never runs this, it reads the committed outputs:

    python tools/make_hf_fixtures.py            # rewrites tests/fixtures/hf/<name>/ for every variant
    python tools/make_hf_fixtures.py llama gpt2 # only these

Each fixture directory holds HF's own `save_pretrained` output (config.json + model.safetensors) and `expected.npz`
(keys documented in tests/fixtures/hf/README.md). Weights are N(0, 0.2) rather than HF's N(0, 0.02) so that greedy
decoding does not collapse onto one token, norm scales are U(0.6, 1.4) and biases N(0, 0.2) so that a dropped scale or
bias changes the logits far beyond the test tolerance. A seed is kept only if the result is robust to float noise:
greedy steps and MoE top-k choices must win by a margin (see MIN_MARGIN), otherwise the next seed is tried.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
MIN_MARGIN = 1e-3  # smallest accepted gap between the winning and the runner-up logit / router score
NEW_TOKENS = 10
B, T, T_PROMPT = 2, 12, 6
V = 128


def _llama_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    return base


# name -> (config class, model class, config kwargs). Every variant exercises something the others do not.
VARIANTS = {
    # GQA 4/2, untied head, default RoPE (theta 10000)
    "llama": ("LlamaConfig", "LlamaForCausalLM", _llama_cfg()),
    # tied head + llama3 RoPE scaling. With Hd=16, theta=1e4 the wavelengths span 6..2e4; original_max=64, low=1,
    # high=4 puts some frequencies in each regime (kept < 16, smoothed 16..64, divided by `factor` > 64).
    "llama_tied_rope3": ("LlamaConfig", "LlamaForCausalLM", _llama_cfg(
        tie_word_embeddings=True, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # sliding window 4, sequences of 12 (forward) and 6 + 10 (generate): most keys fall outside the window
    "mistral": ("MistralConfig", "MistralForCausalLM", _llama_cfg(sliding_window=4, head_dim=16)),
    # 4 experts, top-2, softmax -> top-k -> renormalize
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _llama_cfg(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, router_jitter_noise=0.0)),
    # learned positions, pre-LayerNorm with biases, tanh GELU, fused qkv Conv1D ([in, out] weights), tied head
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=None, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)),
    # post-LayerNorm encoder, token types, padding mask, erf GELU, pooler + MLM head (BertForPreTraining layout,
    # like the original checkpoints: it also carries the NSP head `cls.seq_relationship`, which jaxtx ignores)
    "bert": ("BertConfig", "BertForPreTraining", dict(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)),
    # T5 v1.0: relative buckets, ReLU, tied head with D**-0.5 rescale, no softmax scaling
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=V, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu",
        dropout_rate=0.0, tie_word_embeddings=True, eos_token_id=None, pad_token_id=0, decoder_start_token_id=0)),
    # T5 v1.1 / flan: gated tanh-GELU, untied head, no rescale, asymmetric depth (2 encoder / 1 decoder layers)
    "t5_v1_1": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=V, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0, decoder_start_token_id=0)),
}


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter: matrices N(0, .2), norm scales U(.6, 1.4), biases N(0, .2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            if name.endswith("bias") or name.endswith(".b"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:  # RMSNorm / LayerNorm scale (every 1-D non-bias param in these models)
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=gen))
            elif "relative_attention_bias" in name:  # larger so the T5 bucket mapping matters at 1e-4
                p.copy_(1.0 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def top_margin(scores: torch.Tensor, k: int = 1) -> float:
    """Smallest gap between the k-th and (k+1)-th largest entry along the last axis."""
    s = torch.sort(scores.float(), dim=-1, descending=True).values
    return float((s[..., k - 1] - s[..., k]).min())


def build(name: str, seed: int):
    cfg_cls, model_cls, kw = VARIANTS[name]
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    if name == "t5_v1_1":  # transformers 5 ties lm_head at construction; give the untied head its own tensor
        model.lm_head.weight = torch.nn.Parameter(torch.empty(V, kw["d_model"]))
    randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


def make(name: str, seed: int) -> tuple[dict, dict] | None:
    """Run one variant with one seed; None when a margin check fails (the caller tries another seed)."""
    model = build(name, seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, V, size=(B, T)).astype(np.int64)
    exp, info = {}, {"seed": seed}
    with torch.no_grad():
        if name == "bert":
            types = np.zeros((B, T), np.int64)
            types[:, T // 2:] = 1
            mask = np.ones((B, T), np.int64)
            mask[1, -4:] = 0  # the second row is right-padded
            ids[1, -4:] = 0
            t = lambda a: torch.from_numpy(a)  # noqa: E731
            out = model(input_ids=t(ids), token_type_ids=t(types), attention_mask=t(mask), output_hidden_states=True)
            base = model.bert(input_ids=t(ids), token_type_ids=t(types), attention_mask=t(mask))
            exp.update(input_ids=ids, token_type_ids=types, attention_mask=mask,
                       last_hidden_state=base.last_hidden_state.numpy(), pooler_output=base.pooler_output.numpy(),
                       mlm_logits=out.prediction_logits.numpy())
        elif name.startswith("t5"):
            mask = np.ones((B, T), np.int64)
            mask[1, -3:] = 0
            ids[1, -3:] = 0
            dec = rng.integers(2, V, size=(B, 8)).astype(np.int64)
            dec[:, 0] = 0  # decoder_start_token_id
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        decoder_input_ids=torch.from_numpy(dec))
            exp.update(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, logits=out.logits.numpy(),
                       encoder_last_hidden_state=out.encoder_last_hidden_state.numpy())
            gen = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
            exp.update(prompt_ids=ids, prompt_mask=mask, greedy_ids=gen.sequences[:, 1:].numpy())
            info["greedy_margin"] = min(top_margin(s) for s in gen.scores)
        else:
            kwargs = {"output_router_logits": True} if name == "mixtral" else {}
            out = model(input_ids=torch.from_numpy(ids), **kwargs)
            exp.update(input_ids=ids, logits=out.logits.numpy())
            if name == "mixtral":
                probs = [torch.softmax(r, -1) for r in out.router_logits]
                info["router_margin"] = min(top_margin(p, k=2) for p in probs)
            prompt = ids[:, :T_PROMPT]
            gen = model.generate(input_ids=torch.from_numpy(prompt), attention_mask=torch.ones_like(
                torch.from_numpy(prompt)), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                output_scores=True, return_dict_in_generate=True, pad_token_id=0)
            exp.update(prompt_ids=prompt, greedy_ids=gen.sequences[:, T_PROMPT:].numpy())
            info["greedy_margin"] = min(top_margin(s) for s in gen.scores)
            info["logit_margin"] = top_margin(out.logits)
    assert exp["greedy_ids" if "greedy_ids" in exp else "input_ids"].shape[0] == B
    if "greedy_ids" in exp:
        assert exp["greedy_ids"].shape == (B, NEW_TOKENS), exp["greedy_ids"].shape
        info["distinct_greedy_tokens"] = int(len(np.unique(exp["greedy_ids"])))
    margins = [v for k, v in info.items() if k.endswith("margin")]
    if min(margins, default=1.0) < MIN_MARGIN or info.get("distinct_greedy_tokens", 99) < 4:
        print(f"  {name} seed {seed}: rejected {info}")
        return None
    return model, {"expected": exp, "info": info}


def main(names: list[str]) -> None:
    for name in names or list(VARIANTS):
        first = 100 * (1 + list(VARIANTS).index(name))  # distinct weights per variant (mistral != llama)
        for seed in range(first, first + 40):
            res = make(name, seed)
            if res is not None:
                break
        else:
            raise SystemExit(f"{name}: no seed passed the margin checks")
        model, res = res
        d = OUT / name
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d, safe_serialization=True)
        # int32 ids: what jaxtx feeds its models; float32 everything else
        exp = {k: (v.astype(np.int32) if v.dtype.kind == "i" else v.astype(np.float32))
               for k, v in res["expected"].items()}
        np.savez_compressed(d / "expected.npz", **exp)
        (d / "info.json").write_text(json.dumps(res["info"], indent=1, sort_keys=True) + "\n")
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{name}: {res['info']}, {size / 1024:.0f} KiB")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1:])
