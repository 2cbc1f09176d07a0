"""jaxtx.run_dir: the prompt layout an HF tokenizer applies, the resume allow-list, and `jaxtx convert --from-hf`
writing a run dir that `jaxtx generate --run` (infer.loading) and load_jaxtx read."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxtx.hf
from jaxtx import run_dir as rd
from jaxtx.cli import main
from spm_testing import tiny_sentencepiece

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _hf_copy(tmp_path, name, **files):
    d = tmp_path / name
    shutil.copytree(FIX / name, d)
    for fname, content in files.items():
        (d / fname.replace("__", ".")).write_text(json.dumps(content) if not isinstance(content, str) else content)
    return d


def _sentencepiece(path: Path):
    path.write_bytes(tiny_sentencepiece(100, unk_id=3, bos_id=1, eos_id=2))


def test_prompt_layout_apply():
    assert rd.PromptLayout((1,), (2,)).apply(np.array([5, 6])) == [1, 5, 6, 2]
    assert rd.PromptLayout().apply([7]) == [7]
    assert rd.PromptLayout.from_dict({"prefix": [1], "suffix": []}, "x") == rd.PromptLayout((1,))


def test_hf_layout_from_tokenizer_json_post_processor(tmp_path):
    post = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1]}, "</s>": {"id": "</s>", "ids": [2]}}}
    d = _hf_copy(tmp_path, "llama", tokenizer__json={"post_processor": post})
    assert rd.hf_prompt_layout(d) == rd.PromptLayout((1,), (2,))
    llama3 = {"type": "Sequence", "processors": [{"type": "ByteLevel"}, {**post, "single": post["single"][:2]}]}
    d = _hf_copy(tmp_path / "b", "llama", tokenizer__json={"post_processor": llama3})
    assert rd.hf_prompt_layout(d) == rd.PromptLayout((1,))
    d = _hf_copy(tmp_path / "c", "gpt2", tokenizer__json={"post_processor": {"type": "ByteLevel"}})
    assert rd.hf_prompt_layout(d) == rd.PromptLayout()  # GPT-2's tokenizer adds nothing


def test_hf_layout_from_sentencepiece_and_tokenizer_config(tmp_path):
    d = _hf_copy(tmp_path, "llama")
    _sentencepiece(d / "tokenizer.model")
    assert rd.hf_prompt_layout(d) == rd.PromptLayout((1,))  # LlamaTokenizer: add_bos_token defaults to true
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert rd.hf_prompt_layout(d) == rd.PromptLayout()
    t5 = _hf_copy(tmp_path, "t5")
    _sentencepiece(t5 / "spiece.model")
    assert rd.hf_prompt_layout(t5) == rd.PromptLayout(suffix=(2,))  # T5Tokenizer appends </s>


def test_resume_allow_list():
    old = {"model": {"n_layers": 2, "dtype": "float32", "preset": "a"}, "train": {"steps": 4, "seed": 0},
           "mesh": {"data": 1}, "out_dir": "x"}
    new = {"model": {"n_layers": 2, "dtype": "bfloat16", "preset": "b", "window": None},
           "train": {"steps": 8, "seed": 1}, "mesh": {"data": -1}, "out_dir": "y"}
    safe, unsafe = rd.resume_changes(old, new, {"model": {"window": None}})
    assert sorted(k for k, *_ in safe) == ["mesh.data", "model.dtype", "train.steps"]
    assert unsafe == [("train.seed", 0, 1)]
    _, unsafe = rd.resume_changes(old, {**new, "model": {**new["model"], "window": 8}}, {"model": {"window": None}})
    assert ("model.window", None, 8) in unsafe  # a key an older config.yaml lacks counts as its default


def test_convert_from_hf_writes_a_run_dir_generate_loads(tmp_path, capsys):
    from jaxtx.infer.loading import load_run
    src = _hf_copy(tmp_path, "llama")
    _sentencepiece(src / "tokenizer.model")
    out = tmp_path / "converted"
    assert main(["convert", "--from-hf", str(src), "--to", str(out)]) == 0
    assert rd.is_run_dir(out) and rd.checkpoint_steps(out) == [0]
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    _, want = jaxtx.hf.load(src)
    loaded = load_run(out)
    assert loaded.step == 0 and loaded.tokenizer is not None and loaded.tokenizer.eos_id == 2
    assert loaded.prompt_layout == rd.PromptLayout((1,)) and loaded.note is None
    jax.tree.map(np.testing.assert_array_equal, loaded.params, want)
    cfg, params = jaxtx.hf.load_jaxtx(out)
    jax.tree.map(np.testing.assert_array_equal, params, want)
    rc = main(["generate", "--run", str(out), "--prompt", "def main():", "--max-new-tokens", "3"])
    assert rc == 0, capsys.readouterr().err


def test_write_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    cfg = jaxtx.config.load_model_config("tiny", ["n_layers=1", "d_model=32", "n_heads=4", "d_ff=64",
                                                 "vocab_size=64"])
    with pytest.raises(jaxtx.config.ConfigError, match="not an empty folder"):
        rd.write_model(tmp_path, cfg, {})
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_old_run_dir_without_a_layout_gets_the_training_layout_and_a_note(tmp_path):
    from jaxtx.infer.loading import load_run
    src = _hf_copy(tmp_path, "llama")
    out = tmp_path / "run"
    jaxtx.hf.save_jaxtx(jaxtx.hf.load(src)[0].cfg, jaxtx.hf.load(src)[1], out)
    (out / rd.LAYOUT).unlink()
    loaded = load_run(out)
    assert loaded.prompt_layout == rd.PromptLayout() and "records no prompt layout" in loaded.note


@pytest.mark.parametrize("damage", ["delete _METADATA", "empty manifest.ocdbt", "garbage manifest.ocdbt"])
def test_integrity_check_finds_missing_or_truncated_files(tmp_path, damage):
    model, params = jaxtx.hf.load(FIX / "gpt2")
    jaxtx.hf.save_jaxtx(model.cfg, params, tmp_path / "m")
    state = tmp_path / "m" / "checkpoints" / "0" / "state"
    assert rd.mismatches(rd.abstract_params(model.cfg), rd.state_metadata(state), "params") == []
    action, name = damage.split()
    if action == "delete":
        (state / name).unlink()
    else:
        (state / name).write_bytes(b"" if action == "empty" else b"garbage")
    with pytest.raises(rd.CheckpointDamaged):
        rd.state_metadata(state)


def test_a_lora_run_dir_is_refused_with_what_to_do(tmp_path, capsys):
    """A LoRA run's checkpoints hold only adapters: loading it as a whole model must say so, not fail deep in orbax."""
    src = _hf_copy(tmp_path, "llama")
    out = tmp_path / "run"
    jaxtx.hf.save_jaxtx(jaxtx.hf.load(src)[0].cfg, jaxtx.hf.load(src)[1], out)
    (out / rd.LORA_BASE).write_text(json.dumps({"source": "/bases/llama", "fingerprint": "0" * 64}))
    with pytest.raises(jaxtx.config.ConfigError, match="a LoRA run.*'/bases/llama'"):
        rd.load_params(out)
    assert main(["generate", "--run", str(out), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "a LoRA run" in err and "Traceback" not in err
