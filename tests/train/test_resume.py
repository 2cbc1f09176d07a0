"""Never lose work: a run killed at any moment (SIGKILL, SIGTERM) and rerun ends bitwise-identical to an uninterrupted
run — params, optimizer state and the losses in metrics.jsonl — and a broken newest checkpoint falls back to the
previous one. Subprocesses, a tiny model and a 200 kB slice of the stdlib corpus keep it fast."""
import json
import signal
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import TINY_MODEL, run_cli

STEPS = 30
ARGS = [*TINY_MODEL, "mesh.data=1", "data.source=stdlib", "data.max_chars=200000", "train.seq_len=32",
        "train.batch_size=4", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=10",
        "train.ckpt_every=5", "train.keep_ckpts=3", "train.progress=false", "train.samples=1", "train.sample_tokens=4",
        "optim.warmup_steps=5", "optim.lr=3e-3"]


def _run(out, *extra):
    r = run_cli(["configs/tiny.yaml", *ARGS, f"out_dir={out}", *extra])
    assert r.returncode == 0, r.stdout[-3000:]
    return r.stdout


def _losses(out):
    return [(d["step"], d["loss"]) for d in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())]


def _final_state(out, step=STEPS):
    return ocp.PyTreeCheckpointer().restore(Path(out).absolute() / "checkpoints" / str(step) / "state")


def _assert_same(a, b):
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in la] == list(range(1, STEPS + 1)) == [s for s, _ in lb]
    assert la == lb  # exact float equality, not allclose
    sa, sb = _final_state(a), _final_state(b)
    flat_a, flat_b = (dict(ocp.tree.to_flat_dict(s)) for s in (sa, sb))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


def _kill_when(out, n_lines, sig):
    """Start a run and send `sig` once metrics.jsonl has n_lines lines (i.e. mid-run, between checkpoints)."""
    p = run_cli(["configs/tiny.yaml", *ARGS, f"out_dir={out}"], popen=True)
    path = Path(out) / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300:
        if path.exists() and len(path.read_text().splitlines()) >= n_lines:
            break
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(sig)
    stdout, _ = p.communicate(timeout=120)
    return p.returncode, stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _run(out)
    return out


def test_kill_then_sigterm_then_resume_is_bitwise_identical(reference, tmp_path):
    out = tmp_path / "run"
    rc, _ = _kill_when(out, 8, signal.SIGKILL)  # between checkpoints 5 and 10
    assert rc == -signal.SIGKILL
    rc, stdout = _kill_when(out, 17, signal.SIGTERM)
    assert rc == 0 and "interrupted by SIGTERM" in stdout, stdout[-2000:]
    resumed = _run(out)
    assert "resuming from" in resumed
    _assert_same(reference, out)
    assert (out / "loss.png").stat().st_size > 1000 and (out / "tokenizer.model").exists()
    assert list((out / "tb").glob("events*")) and (out / "config.yaml").exists()
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [STEPS - 10, STEPS - 5, STEPS]  # keep_ckpts=3: the newest three


def test_unreadable_newest_checkpoint_falls_back(reference, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / str(STEPS) / "state"
    for f in newest.rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"garbage")
    stdout = _run(out)
    assert f"checkpoint step {STEPS}" in stdout and "unreadable" in stdout and f"checkpoints/{STEPS - 5}" in stdout
    _assert_same(reference, out)  # steps 26..30 were redone, bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [[2, 11], [6, 15, 23], [25, 29]])
def test_sigkill_at_several_points(reference, tmp_path, kill_at):
    out = tmp_path / "run"
    for n in kill_at:
        _kill_when(out, n, signal.SIGKILL)
    _run(out)
    _assert_same(reference, out)
