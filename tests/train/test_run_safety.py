"""A rerun, a bad out_dir or a bad train.init_from never loses or silently corrupts a run (issue 10, data-loss cases
1-4 and the run-dir errors). Each case checksums every file of the run before and after: on the old code each test
fails (the run was overwritten, set aside, retrained or its set-aside copy deleted). In process, through the real
`jaxtx train` entry point (exit codes, messages), on a tiny model and synthetic data."""
import hashlib
import shutil
import signal
import time
from pathlib import Path

import pytest
from train_helpers import ONE_DEVICE, TINY_MODEL, run_cli

from jaxtx import run_dir as rd
from jaxtx.cli import main

ARGS = [*TINY_MODEL, *ONE_DEVICE, "data.source=synthetic", "data.n_examples=300", "train.seq_len=32",
        "train.batch_size=4", "train.steps=4", "train.log_every=1", "train.eval_every=2", "train.ckpt_every=2",
        "train.eval_batches=1", "train.progress=false", "train.samples=1", "train.sample_tokens=4"]


@pytest.fixture(autouse=True)
def _no_persistent_cache(monkeypatch):
    import jaxtx.train.cli
    monkeypatch.setattr(jaxtx.train.cli, "setup_jax_cache", lambda: None)  # keep the test process's own jax config


def _train(out, *extra, capsys):
    rc = main(["train", "configs/tiny.yaml", *ARGS, f"out_dir={out}", *extra])
    got = capsys.readouterr()
    return rc, got.out + got.err


def _sums(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run: checkpoints 2 and 4, metrics, eval, tokenizer, prompt layout."""
    out = tmp_path_factory.mktemp("finished") / "run"
    from jaxtx.train.config import load_run_config
    from jaxtx.train.loop import train
    train(load_run_config("configs/tiny.yaml", [*ARGS, f"out_dir={out}"]), log=lambda *a: None)
    assert rd.checkpoint_steps(out) == [2, 4]
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------------------------------------ case 1 + 2
@pytest.mark.parametrize("change,key,old,new", [
    (["model.n_layers=3"], "model.n_layers", "2", "3"),  # case 1: other shapes
    (["model.activation=relu", "model.position=alibi"], "model.position", "'rope'", "'alibi'"),  # case 2: same shapes
    (["data.n_examples=500"], "data.n_examples", "300", "500"),  # other data: other rows, other tokenizer
    (["train.seq_len=64"], "train.seq_len", "32", "64"),
    (["optim.b2=0.99"], "optim.b2", "0.95", "0.99"),
])
def test_rerun_with_other_settings_refuses_and_touches_nothing(run, capsys, change, key, old, new):
    before = _sums(run)
    rc, text = _train(run, *change, capsys=capsys)
    assert rc == 2 and "Traceback" not in text, text
    assert f"{key}: {old} in config.yaml, {new} now" in text, text
    assert _sums(run) == before  # config.yaml, metrics, checkpoints: byte for byte
    assert not (run / rd.ASIDE).exists()


def test_safe_changes_resume_and_are_recorded(run, capsys):
    rc, text = _train(run, "train.steps=6", "train.eval_every=3", "optim.lr=1e-3", capsys=capsys)
    assert rc == 0, text
    assert "train.steps changed from 4 to 6" in text and "resuming from" in text, text
    assert rd.read_config(run)["train"]["steps"] == 6
    assert rd.checkpoint_steps(run)[-1] == 6


def test_shape_mismatch_in_a_checkpoint_is_a_config_mismatch_not_damage(run, capsys):
    """config.yaml agrees with the command, but the checkpoint was written for another shape (e.g. a hand-edited
    config.yaml): refused as a mismatch naming the array; nothing is set aside."""
    conf = rd.read_config(run)
    conf["model"]["d_ff"] = 256
    rd.write_config(run, conf)
    before = _sums(run)
    rc, text = _train(run, "model.d_ff=256", capsys=capsys)
    assert rc == 2 and "does not fit" in text, text
    assert "params.layers.mlp.wi_gate.kernel: checkpoint (2, 64, 128) float32 vs config (2, 64, 256)" in text, text
    assert "Traceback" not in text
    assert _sums(run) == before and not (run / rd.ASIDE).exists()


def test_damaged_checkpoints_are_set_aside_under_unique_names(run, capsys):
    """Only a checkpoint that fails its own integrity check is unreadable; every set-aside copy is kept."""
    def damage(step):
        for f in (run / "checkpoints" / str(step) / "state").rglob("*manifest*"):
            f.write_bytes(b"garbage")
        return _sums(run / "checkpoints" / str(step))

    first = damage(4)
    rc, text = _train(run, capsys=capsys)
    assert rc == 0 and "checkpoint step 4" in text and "unreadable" in text, text
    assert _sums(run / rd.ASIDE / "4") == first
    second = damage(4)  # the redone step 4 breaks too
    rc, text = _train(run, capsys=capsys)
    assert rc == 0, text
    assert _sums(run / rd.ASIDE / "4") == first and _sums(run / rd.ASIDE / "4.1") == second
    assert rd.checkpoint_steps(run) == [2, 4]


# ------------------------------------------------------------------------------------------------ case 3, 4
def test_a_folder_that_is_not_a_run_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("learning_rate: 0.1\n")  # someone else's config
    (out / "metrics.jsonl").write_text('{"acc": 0.9}\n')
    before = _sums(out)
    rc, text = _train(out, capsys=capsys)
    assert rc == 2 and "not a jaxtx run dir" in text and str(out) in text, text
    assert _sums(out) == before


def test_missing_tokenizer_with_checkpoints_is_refused(run, capsys):
    (run / "tokenizer.model").unlink()
    before = _sums(run)
    rc, text = _train(run, capsys=capsys)
    assert rc == 2 and "tokenizer.model is missing" in text and "Traceback" not in text, text
    assert _sums(run) == before and not (run / "tokenizer.model").exists()


# ------------------------------------------------------------------------------------------------ out_dir, init_from
@pytest.mark.parametrize("where", ["file", "below_file"])
def test_out_dir_that_is_a_file(tmp_path, capsys, where):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    out = f if where == "file" else f / "run"
    rc, text = _train(out, capsys=capsys)
    assert rc == 2 and "Traceback" not in text and str(f) in text and "is a file" in text, text
    assert len(text.strip().splitlines()) == 1 and f.read_text() == "keep me"


def test_init_from_typo_creates_nothing(tmp_path, capsys):
    rc, text = _train(tmp_path / "new" / "run", f"train.init_from={tmp_path / 'typo'}", capsys=capsys)
    assert rc == 2 and "train.init_from=" in text and "no such folder" in text, text
    assert list(tmp_path.iterdir()) == []


def test_init_from_another_shape_names_the_param(finished, tmp_path, capsys):
    rc, text = _train(tmp_path / "new", f"train.init_from={finished}", "model.d_model=32", "model.n_heads=2",
                      "model.n_kv_heads=1", capsys=capsys)
    assert rc == 2 and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1 and "train.init_from=" in text
    assert "params.embed.embedding: checkpoint (512, 64) float32 vs config (512, 32) float32" in text, text
    assert list(tmp_path.iterdir()) == []


def test_init_from_reuses_the_init_runs_tokenizer_and_is_not_needed_to_resume(finished, tmp_path, capsys):
    init = tmp_path / "init"
    shutil.copytree(finished, init)
    args = [f"train.init_from={init}", "train.steps=2", "data.n_examples=500"]
    rc, text = _train(tmp_path / "new", *args, capsys=capsys)
    assert rc == 0, text
    assert (tmp_path / "new" / "tokenizer.model").read_bytes() == (finished / "tokenizer.model").read_bytes()
    shutil.rmtree(init)  # a resumed run has its own checkpoint: the folder it started from may be gone
    rc, text = _train(tmp_path / "new", *args, "train.steps=3", capsys=capsys)
    assert rc == 0 and "resuming from" in text, text


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    rc, text = _train(tmp_path / "a" / "b", "data.source=jsonl", f"data.path={bad}", capsys=capsys)
    assert rc == 2 and "data.jsonl:2" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _ = _train(empty, "data.source=jsonl", f"data.path={bad}", capsys=capsys)
    assert rc == 2 and empty.is_dir() and list(empty.iterdir()) == []


def test_non_finite_before_the_first_checkpoint_leaves_nothing(tmp_path, capsys):
    rc, text = _train(tmp_path / "run", "optim.lr=1e9", "optim.warmup_steps=0", "optim.clip_norm=0",
                      "train.steps=30", "train.ckpt_every=0", "train.eval_every=0", capsys=capsys)
    assert rc == 1 and "non-finite" in text, text
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ 0 = off
def test_eval_every_0_and_ckpt_every_0_keep_only_the_final_ones(tmp_path, capsys):
    out = tmp_path / "run"
    rc, text = _train(out, "train.eval_every=0", "train.ckpt_every=0", "train.steps=5", capsys=capsys)
    assert rc == 0, text
    assert rd.checkpoint_steps(out) == [5]
    assert [line for line in (out / "eval.jsonl").read_text().splitlines() if line].__len__() == 1


def test_ckpt_every_0_still_saves_on_sigterm(tmp_path):
    out = tmp_path / "run"
    p = run_cli(["configs/tiny.yaml", *ARGS, "train.steps=100000", "train.ckpt_every=0", "train.eval_every=0",
                 f"out_dir={out}"], popen=True)
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "interrupted by SIGTERM" in stdout, stdout[-2000:]
    steps = rd.checkpoint_steps(out)
    assert len(steps) == 1 and steps[0] >= 3


def test_the_run_records_its_prompt_layout_for_generate(finished):
    from jaxtx.infer.loading import load_run
    assert rd.read_prompt_layout(finished) == rd.PromptLayout()  # causal: nothing before the user's text
    loaded = load_run(finished)
    assert loaded.prompt_layout == rd.PromptLayout() and loaded.note is None and loaded.step == 4
