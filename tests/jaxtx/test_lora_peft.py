"""Hugging Face PEFT exchange: adapters made by real peft (tests/fixtures/peft, tools/make_peft_fixtures.py) give
jaxtx the logits HF + PEFT gave, and an adapter jaxtx writes is the one PEFT read when it made its logits."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtx.hf as hf
from jaxtx.lora import LoraConfig, add_lora, load_peft, merge, save_peft
from jaxtx.lora.peft import PeftError

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def jaxtx_gpt2_adapter():
    """A jaxtx-made GPT-2 adapter: separate (random) a for q, k and v (so c_attn is written block-diagonal), a rank
    pattern, random b. tools/make_peft_fixtures.py writes it with save_peft and records PEFT's logits for it."""
    model, params = hf.load(FIX / "hf" / "gpt2")
    lc = LoraConfig(r=4, alpha=8.0, target_modules=["c_attn", "c_fc"], rank_pattern={"h.1.mlp.c_fc": 2})
    params = add_lora(model, params, lc, jax.random.key(3))

    def walk(tree, prefix):
        if "lora_a" not in tree:
            return {k: walk(v, prefix + k) if isinstance(v, dict) else v for k, v in tree.items()}
        ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(4), sum(map(ord, prefix)) * len(prefix)))
        a, b = tree["lora_a"], tree["lora_b"]
        # layer 1's c_fc has r=2 inside the stack's r=4: its padding (zero columns of a, rows of b) stays zero
        used = jnp.abs(a).sum(1) > 0  # [L, r]
        return {**tree, "lora_a": jax.random.normal(ka, a.shape) * 0.1 * used[:, None, :],
                "lora_b": jax.random.normal(kb, b.shape) * 0.1 * used.reshape(used.shape + (1,) * (b.ndim - 2))}
    params = walk(params, "")
    return model, params


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("scan", [True, False])
def test_peft_logits_match(name, scan):
    exp = np.load(FIX / "peft" / name / "expected.npz")
    model, params = hf.load(FIX / "hf" / name, scan_layers=scan)
    model, params = load_peft(model, params, FIX / "peft" / name)
    logits = model.apply({"params": params}, jnp.asarray(exp["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=1e-4, rtol=1e-4)
    base = hf.load(FIX / "hf" / name, scan_layers=scan)[1]
    assert np.abs(np.asarray(model.apply({"params": base}, jnp.asarray(exp["input_ids"]))) - exp["logits"]).max() > 1e-2
    merged = model.apply({"params": merge(model, params)}, jnp.asarray(exp["input_ids"]))
    np.testing.assert_allclose(np.asarray(merged), exp["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scan", [True, False])
def test_peft_round_trip_is_exact(tmp_path, scan):
    """load -> save -> load gives the same adapter numbers (llama: rank and alpha patterns, all-linear)."""
    model, base = hf.load(FIX / "hf" / "llama", scan_layers=scan)
    _, p1 = load_peft(model, base, FIX / "peft" / "llama")
    save_peft(model, p1, tmp_path, base_model_name_or_path="x")
    _, p2 = load_peft(model, base, tmp_path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)


def test_jaxtx_adapter_is_what_peft_read(tmp_path):
    """save_peft writes today the tensors PEFT loaded to make gpt2_from_jaxtx's logits, and jaxtx's own logits
    with that adapter (unmerged) equal PEFT's."""
    model, params = jaxtx_gpt2_adapter()
    save_peft(model, params, tmp_path, base_model_name_or_path="tests/fixtures/hf/gpt2")
    from jaxtx.hf.safetensors_io import TensorFile
    ref, new = (TensorFile(d / "adapter_model.safetensors") for d in (FIX / "peft" / "gpt2_from_jaxtx", tmp_path))
    assert sorted(ref.meta) == sorted(new.meta)
    for k in ref.meta:
        np.testing.assert_allclose(new.get(k), ref.get(k), atol=1e-7)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == json.loads(
        (FIX / "peft" / "gpt2_from_jaxtx" / "adapter_config.json").read_text())
    exp = np.load(FIX / "peft" / "gpt2_from_jaxtx" / "expected.npz")
    logits = model.apply({"params": params}, jnp.asarray(exp["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=1e-4, rtol=1e-4)


def _adapter_dir(tmp_path, **config):
    """A copy of the llama fixture adapter with config keys changed."""
    d = tmp_path / "adapter"
    d.mkdir()
    src = FIX / "peft" / "llama"
    c = json.loads((src / "adapter_config.json").read_text())
    c.update(config)
    (d / "adapter_config.json").write_text(json.dumps(c))
    (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return d


def test_unknown_newer_config_keys_are_tolerated(tmp_path):
    model, base = hf.load(FIX / "hf" / "llama")
    d = _adapter_dir(tmp_path, some_future_option={"x": 1}, lora_ga_config=None)
    load_peft(model, base, d)


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora=True: DoRA is not supported"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 5}, "has rank 4 but adapter_config.json gives r=5"),
])
def test_unsupported_adapters_are_refused(tmp_path, change, match):
    model, base = hf.load(FIX / "hf" / "llama")
    with pytest.raises(PeftError, match=match):
        load_peft(model, base, _adapter_dir(tmp_path, **change))


def test_adapter_for_another_model_is_refused():
    model, base = hf.load(FIX / "hf" / "gpt2")
    with pytest.raises(PeftError, match="not a linear layer of this gpt2 model"):
        load_peft(model, base, FIX / "peft" / "llama")


def test_half_an_adapter_is_refused(tmp_path):
    from jaxtx.hf.safetensors_io import TensorFile, write
    d = _adapter_dir(tmp_path)
    src = TensorFile(FIX / "peft" / "llama" / "adapter_model.safetensors")
    keep = {k: np.array(src.get(k)) for k in src.meta if "layers.0.self_attn.q_proj" not in k or "lora_A" in k}
    write(d / "adapter_model.safetensors", keep, {"format": "pt"})
    model, base = hf.load(FIX / "hf" / "llama")
    with pytest.raises(PeftError, match="q_proj' has only lora_A; expected lora_A and lora_B"):
        load_peft(model, base, d)


def test_save_peft_never_overwrites_what_it_did_not_write(tmp_path):
    """A non-empty folder is refused (bytes unchanged); overwrite=True replaces an adapter folder whole (no stale
    files), and never a folder of other files, even with overwrite=True."""
    model, base = hf.load(FIX / "hf" / "llama")
    _, p1 = load_peft(model, base, FIX / "peft" / "llama")
    out = tmp_path / "adapter"
    save_peft(model, p1, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        save_peft(model, p1, out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    (out / "stale.txt").write_text("x")
    save_peft(model, p1, out, overwrite=True)
    assert sorted(f.name for f in out.iterdir()) == sorted(before)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        save_peft(model, p1, mine, overwrite=True)
    assert (mine / "todo.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden sibling left behind
