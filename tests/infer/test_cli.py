"""`jaxtx generate` end to end: an HF fixture reproduces transformers' greedy tokens through the CLI, a run dir in the
`jaxtx train` layout (written here independently) loads and streams text, and bad input gives a clear error."""
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxtx.cli import main

from infer_models import small_model
from spm_testing import tiny_sentencepiece

HF_LLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama"


def _run_cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_hf_greedy_through_the_cli(capsys):
    if not (HF_LLAMA / "expected.npz").exists():
        pytest.skip("llama fixture not present yet")
    exp = np.load(HF_LLAMA / "expected.npz")
    ids = ",".join(map(str, exp["prompt_ids"][0]))
    rc, out, err = _run_cli(["generate", "--hf", str(HF_LLAMA), "--prompt-ids", ids, "--max-new-tokens", "10"], capsys)
    assert rc == 0, err
    assert [int(t) for t in out.split()] == exp["greedy_ids"][0].tolist()


@pytest.mark.parametrize("argv,msg", [
    (["--prompt-ids", "1,2,500"], "token id 500 at index 2 is outside the vocabulary"),
    (["--prompt-ids", ""], "prompt 0 is empty"),
    (["--prompt-ids", "1,2,3,4,5", "--max-len", "4"], "prompt 0 has 5 tokens but the cache holds at most 4"),
    (["--prompt", "hello"], "no tokenizer"),
])
def test_clear_errors(argv, msg, capsys):
    if not (HF_LLAMA / "config.json").exists():
        pytest.skip("llama fixture not present yet")
    rc, _, err = _run_cli(["generate", "--hf", str(HF_LLAMA)] + argv, capsys)
    assert rc == 2 and msg in err, err


def _write_run_dir(path: Path, overrides=(), vocab=128):
    """The layout `jaxtx train` writes: config.yaml (resolved, model section = every ModelConfig field + preset),
    tokenizer.model, checkpoints/<step>/state with the TrainState dict."""
    model, params = small_model("llama", tuple(overrides) + (f"vocab_size={vocab}",))
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(tiny_sentencepiece(128, code_lines=200))
    conf = {"model": {"preset": "tiny", **model.cfg.to_dict()}, "data": {"tokenizer": None}, "out_dir": str(path)}
    (path / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    state = {"step": np.int32(7), "params": params, "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}}
    with ocp.CheckpointManager(path / "checkpoints") as m:
        m.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 7})))
        m.wait_until_finished()
    return model, params


def test_run_dir_loads_and_streams(tmp_path, capsys):
    from jaxtx.infer import generate
    from jaxtx.infer.loading import load_run
    model, params = _write_run_dir(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert loaded.step == 7 and loaded.model.cfg == model.cfg and loaded.tokenizer.eos_id == 3
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    tok = loaded.tokenizer
    # no layout recorded: a decoder run is prompted with the bare text, as its packed documents began (no EOS first)
    assert loaded.prompt_layout.apply([7, 8]) == [7, 8]
    prompt = tok.encode("def main():")
    want = generate(model, params, [prompt], max_new_tokens=12, eos_id=3).tokens[0]
    rc, out, err = _run_cli(["generate", "--run", str(tmp_path / "run"), "--prompt", "def main():",
                             "--max-new-tokens", "12"], capsys)
    assert rc == 0, err
    assert out == tok.decode(want) + "\n"
    # a stop string cuts the text exactly
    text = tok.decode(want)
    assert len(text) > 4, text
    stop = text[2:4]
    rc, out, _ = _run_cli(["generate", "--run", str(tmp_path / "run"), "--prompt", "def main():",
                           "--max-new-tokens", "12", "--stop", stop], capsys)
    assert rc == 0 and out == text[: text.find(stop)] + "\n"
    # a batch from a prompts file: one block per prompt, same tokens as generate()
    (tmp_path / "prompts.txt").write_text("def main():\nhello world\n")
    rc, out, err = _run_cli(["generate", "--run", str(tmp_path / "run"),
                             "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "12"], capsys)
    assert rc == 0, err
    second = generate(model, params, [tok.encode("hello world")], max_new_tokens=12, eos_id=3).tokens[0]
    assert out == f"=== 0\n{text}\n=== 1\n{tok.decode(second)}\n"


def test_incompatible_draft_vocab(tmp_path, capsys):
    _write_run_dir(tmp_path / "target")
    _write_run_dir(tmp_path / "draft", ("n_layers=1",), vocab=130)
    rc, _, err = _run_cli(["generate", "--run", str(tmp_path / "target"), "--prompt", "hello",
                           "--draft", str(tmp_path / "draft")], capsys)
    assert rc == 2 and "vocab_size=130 differs from the target's 128" in err, err
