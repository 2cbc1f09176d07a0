"""jaxtx.hf against the committed HF fixtures (tests/fixtures/hf, made by tools/make_hf_fixtures.py).

- logits parity with transformers for every family (float32, 1e-4 abs)
- save -> load is bit-exact, and save writes the very tensors HF wrote
- save -> transformers from_pretrained gives the same outputs (skipped without torch/transformers, as in CI)
- one error lists every missing / unexpected / mis-shaped / mis-typed tensor; unsupported model types and pickle-only
  directories are refused with a clear message
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtx.config
import jaxtx.hf
import jaxtx.model
from jaxtx.hf import mapping
from jaxtx.hf.config import canonical
from jaxtx.hf.safetensors_io import TensorFile, write

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
DECODERS = ["llama", "llama_tied_rope3", "mistral", "mixtral", "gpt2"]
ALL = DECODERS + ["bert", "t5", "t5_v1_1"]
TOL = 1e-4


@functools.cache
def loaded(name: str, scan: bool = True):
    return jaxtx.hf.load(FIX / name, scan_layers=scan)


def expected(name: str) -> dict:
    with np.load(FIX / name / "expected.npz") as z:
        return dict(z)


def outputs(model, params, name: str) -> dict[str, np.ndarray]:
    """jaxtx outputs under the same names as expected.npz."""
    z = expected(name)

    @jax.jit
    def run(params):
        v = {"params": params}
        if name == "bert":
            a = (z["input_ids"], z["token_type_ids"], z["attention_mask"])
            return {"last_hidden_state": model.apply(v, *a), "pooler_output": model.apply(v, *a, method="pooled"),
                    "mlm_logits": model.apply(v, *a, method="masked_lm")}
        if name.startswith("t5"):
            return {"logits": model.apply(v, z["input_ids"], decoder_input_ids=z["decoder_input_ids"],
                                          attention_mask=z["attention_mask"]),
                    "encoder_last_hidden_state": model.apply(v, z["input_ids"], z["attention_mask"], method="encode")}
        return {"logits": model.apply(v, z["input_ids"])}

    with jax.default_matmul_precision("highest"):
        return run(params)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ALL)
def test_outputs_match_transformers(name):
    model, params = loaded(name)
    z = expected(name)
    for key, got in outputs(model, params, name).items():
        err = float(np.max(np.abs(np.asarray(got, np.float32) - z[key])))
        assert err < TOL, f"{name}/{key}: max abs diff {err:.3g} vs HF (tolerance {TOL})"


def test_unrolled_layers_match_scanned():
    m1, p1 = loaded("mixtral", True)
    m2, p2 = loaded("mixtral", False)
    assert "layers" in p1 and "layers_0" in p2 and "layers_1" in p2
    jax.tree.map(np.testing.assert_array_equal, jaxtx.model.unstack_layers(p1), p2)
    np.testing.assert_allclose(outputs(m2, p2, "mixtral")["logits"], outputs(m1, p1, "mixtral")["logits"],
                               atol=1e-5)


def test_configs_read_from_fixtures():
    cfg = loaded("llama_tied_rope3")[0].cfg
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len, cfg.tie_embeddings) == \
        ("llama3", 8.0, 64, True)
    assert loaded("mistral")[0].cfg.window == 4
    assert loaded("mixtral")[0].cfg.num_experts == 4 and loaded("mixtral")[0].cfg.experts_per_token == 2
    bert = loaded("bert")[0].cfg
    assert bert.norm_position == "post" and bert.pooler and bert.mlm_head and bert.type_vocab_size == 2
    hf_config = lambda name: json.loads((FIX / name / "config.json").read_text())  # noqa: E731
    assert jaxtx.hf.config_from_hf(hf_config("t5")).rescale_tied_logits
    v11 = jaxtx.hf.config_from_hf(hf_config("t5_v1_1"))
    assert v11.gated and v11.activation == "gelu_tanh" and not v11.rescale_tied_logits
    # transformers 5 writes tie_word_embeddings=true for v1.1 too; the separate lm_head.weight unties it on load
    assert not loaded("t5_v1_1")[0].cfg.tie_embeddings and loaded("t5")[0].cfg.tie_embeddings


def test_config_from_hf_variants():
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    # a transformers 4 file: rope in top-level rope_theta + rope_scaling
    v4 = jaxtx.hf.config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert (v4.rope_theta, v4.rope_scaling, v4.rope_original_max_len) == (500000.0, "llama3", 8192)
    # Mixtral's "head_dim": null, a Mistral with "sliding_window": null
    mx = jaxtx.hf.config_from_hf({**base, "model_type": "mixtral", "head_dim": None, "num_local_experts": 8,
                                  "num_experts_per_tok": 2})
    assert mx.hd == 16 and mx.num_experts == 8
    assert jaxtx.hf.config_from_hf({**base, "model_type": "mistral", "sliding_window": None}).window is None
    # T5 v1.1 / flan as published (transformers 4): untied, no rescale
    t5 = dict(model_type="t5", vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    c = jaxtx.hf.config_from_hf(t5)
    assert (c.tie_embeddings, c.rescale_tied_logits, c.activation, c.gated) == (False, False, "gelu_tanh", True)
    with pytest.raises(jaxtx.hf.HFConversionError, match="rope type 'dynamic'"):
        jaxtx.hf.config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


@pytest.mark.parametrize("preset", ["llama3-8b", "mistral-7b", "mixtral-8x7b", "gpt2", "bert-base", "t5-small",
                                    "t5-v1_1-base"])
def test_presets_have_exact_hf_configs(preset):
    def arch(c):  # what the checkpoint computes; training and numerics settings do not travel through HF
        return canonical(c).replace(name="x", dtype="float32", param_dtype="float32", dropout=0.0, init_std=0.02,
                                    remat="none", router_aux_loss_coef=0.0)

    cfg = jaxtx.config.load_model_config(preset)
    assert arch(jaxtx.hf.config_from_hf(jaxtx.hf.config_to_hf(cfg))) == arch(cfg)


def test_config_without_hf_equivalent_is_refused():
    cfg = jaxtx.config.load_model_config("tiny", ["position=alibi"])
    with pytest.raises(jaxtx.hf.HFConversionError, match="position='alibi'"):
        jaxtx.hf.config_to_hf(cfg)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip_is_exact(name, tmp_path):
    model, params = loaded(name)
    jaxtx.hf.save(model, params, tmp_path)
    model2, params2 = jaxtx.hf.load(tmp_path)
    assert canonical(model2.cfg) == canonical(model.cfg)
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    # and the tensors written are exactly the ones HF wrote (modulo tensors jaxtx ignores, e.g. BERT's NSP head)
    orig = TensorFile(FIX / name / "model.safetensors")
    saved = TensorFile(tmp_path / "model.safetensors")
    mt = json.loads((FIX / name / "config.json").read_text())["model_type"]
    kept = {n for n in orig.meta if not mapping.is_ignored(mt, n)}
    assert set(saved.meta) == kept
    for n in kept:
        np.testing.assert_array_equal(saved.get(n), orig.get(n), err_msg=n)


def test_sharded_bf16_round_trip(tmp_path):
    model, params = jaxtx.hf.load(FIX / "llama", dtype="bfloat16", scan_layers=False)
    assert model.cfg.param_dtype == "bfloat16" and jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    jaxtx.hf.save(model, params, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model2, params2 = jaxtx.hf.load(tmp_path, scan_layers=False)
    assert model2.cfg.param_dtype == "bfloat16"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_convert_cli_round_trip(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    jaxtx.hf.add_convert_args(p)
    jaxtx.hf.convert_main(p.parse_args(["--from-hf", str(FIX / "gpt2"), "--to", str(tmp_path / "jx")]))
    assert (tmp_path / "jx" / "config.yaml").exists()  # a jaxtx run dir (jaxtx.run_dir)
    jaxtx.hf.convert_main(p.parse_args(["--from-jaxtx", str(tmp_path / "jx"), "--to-hf", "--to", str(tmp_path / "hf")]))
    _, a = loaded("gpt2")
    _, b = jaxtx.hf.load(tmp_path / "hf")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    with pytest.raises(jaxtx.hf.HFConversionError, match="--to-hf"):  # a ValueError: the CLI exits 2
        jaxtx.hf.convert_main(p.parse_args(["--from-jaxtx", "x", "--to", "y"]))


@pytest.mark.parametrize("name", ALL)
def test_transformers_loads_what_jaxtx_saves(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, params = loaded(name)
    jaxtx.hf.save(model, params, tmp_path)
    z = expected(name)
    t = lambda k: torch.from_numpy(z[k].astype(np.int64))  # noqa: E731
    kw = dict(attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        if name == "bert":
            a = dict(input_ids=t("input_ids"), token_type_ids=t("token_type_ids"), attention_mask=t("attention_mask"))
            base = transformers.AutoModel.from_pretrained(tmp_path, **kw).eval()(**a)
            mlm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, **kw).eval()(**a)
            got = {"last_hidden_state": base.last_hidden_state, "pooler_output": base.pooler_output,
                   "mlm_logits": mlm.logits}
        elif name.startswith("t5"):
            m = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, **kw).eval()
            got = {"logits": m(input_ids=t("input_ids"), attention_mask=t("attention_mask"),
                               decoder_input_ids=t("decoder_input_ids")).logits}
        else:
            got = {"logits": transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **kw).eval()(
                t("input_ids")).logits}
    for k, v in got.items():
        err = float(np.max(np.abs(v.numpy() - z[k])))
        assert err < TOL, f"{name}/{k}: transformers on the jaxtx-saved checkpoint differs by {err:.3g}"


# ------------------------------------------------------------------------------------------------ errors
def _broken_copy(tmp_path: Path, name: str, edit) -> Path:
    d = tmp_path / name
    shutil.copytree(FIX / name, d)
    tf = TensorFile(d / "model.safetensors")
    tensors = {n: np.array(tf.get(n)) for n in tf.meta}
    edit(tensors)
    write(d / "model.safetensors", tensors, {"format": "pt"})
    return d


def test_one_error_lists_every_bad_tensor(tmp_path):
    def edit(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.0.extra_scale"] = np.ones(3, np.float32)
        t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].astype(np.int32)

    d = _broken_copy(tmp_path, "llama", edit)
    with pytest.raises(jaxtx.hf.HFConversionError) as e:
        jaxtx.hf.load(d)
    msg = str(e.value)
    for needle in ["missing tensors (2)", "model.layers.1.self_attn.k_proj.weight (expected shape [32, 64])",
                   "model.norm.weight", "unexpected tensors (1)", "model.layers.0.extra_scale",
                   "model.layers.0.self_attn.q_proj.weight: shape [64, 32], expected [64, 64]",
                   "model.layers.1.mlp.up_proj.weight: dtype I32"]:
        assert needle in msg, f"{needle!r} not in:\n{msg}"


def test_base_model_without_prefix_and_gamma_beta_names_load(tmp_path):
    """A headless BertModel file with the old TF-style LayerNorm.gamma/beta names (no pooler rename needed)."""
    def edit(t):
        for n in list(t):
            new = n[len("bert."):] if n.startswith("bert.") else None
            if n.startswith("cls."):
                del t[n]
            elif new is not None:
                new = new.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                t[new] = t.pop(n)

    d = _broken_copy(tmp_path, "bert", edit)
    model, params = jaxtx.hf.load(d)
    assert model.cfg.pooler and not model.cfg.mlm_head and "mlm" not in params
    _, full = loaded("bert")
    np.testing.assert_array_equal(params["embed_norm"]["scale"], full["embed_norm"]["scale"])


def _gpt2_hub_style(t):  # the GPT-2 hub file: GPT2Model names (no "transformer."), causal-mask buffers
    for n in list(t):
        t[n.removeprefix("transformer.")] = t.pop(n)
    t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    t["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)


def _t5_hub_style(t):  # t5-small on the hub: tied copies of the embedding and a cross-attention table HF ignores
    for n in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        t[n] = t["shared.weight"]
    t["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)


@pytest.mark.parametrize("name,edit", [("gpt2", _gpt2_hub_style), ("t5", _t5_hub_style)])
def test_hub_style_files_load_to_the_same_params(tmp_path, name, edit):
    _, params = jaxtx.hf.load(_broken_copy(tmp_path, name, edit))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, loaded(name)[1])


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gptj", "n_embd": 64}))
    with pytest.raises(jaxtx.hf.HFConversionError, match=r"model_type='gptj': unsupported; .*'llama'.*'t5'"):
        jaxtx.hf.load(tmp_path)


def test_pickle_files_are_never_loaded(tmp_path):
    shutil.copy(FIX / "gpt2" / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle; must not be opened")
    with pytest.raises(jaxtx.hf.HFConversionError, match="pytorch_model.bin.*never loads"):
        jaxtx.hf.load(tmp_path)


def test_save_refuses_params_that_do_not_fit(tmp_path):
    model, params = loaded("gpt2")
    bad = dict(params, extra={"kernel": jnp.zeros(3)})
    bad.pop("final_norm")
    with pytest.raises(jaxtx.hf.HFConversionError) as e:
        jaxtx.hf.save(model, bad, tmp_path)
    assert "final_norm/scale" in str(e.value) and "extra/kernel" in str(e.value)


def test_convert_a_training_run_dir_to_hf(tmp_path):
    """`jaxtx convert --from-jaxtx RUN_DIR --to-hf` reads the layout `jaxtx train` writes (newest checkpoint)."""
    import orbax.checkpoint as ocp
    import yaml

    from jaxtx.cli import main

    model, params = loaded("llama")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": "x", **model.cfg.to_dict()}}))
    old = jax.tree.map(jnp.zeros_like, params)
    with ocp.CheckpointManager(run / "checkpoints") as m:
        for step, p in [(3, old), (9, params)]:
            state = {"step": np.int32(step), "params": p, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, p)}}
            m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        m.wait_until_finished()
    assert main(["convert", "--from-jaxtx", str(run), "--to-hf", "--to", str(tmp_path / "hf")]) == 0
    _, back = jaxtx.hf.load(tmp_path / "hf")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)
