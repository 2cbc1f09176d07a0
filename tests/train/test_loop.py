"""The loop end to end, in process: every objective's tiny run config trains a few steps through the real data path
(span corruption on the fly, MLM masking, DPO reference); non-finite losses stop the run or are skipped and counted."""
import json

import pytest
from train_helpers import ONE_DEVICE

from jaxtx.train.config import load_run_config
from jaxtx.train.loop import NonFiniteError, train

FAST = [*ONE_DEVICE, "train.progress=false", "train.steps=6", "train.log_every=2", "train.eval_every=3",
        "train.ckpt_every=3", "train.eval_batches=1", "train.samples=1", "train.sample_tokens=4"]


# causal and sft run end to end in test_resume / test_learning already: slow-only here to keep the suite short
@pytest.mark.parametrize("name", [pytest.param("causal", marks=pytest.mark.slow), "mlm", "span",
                                  pytest.param("sft", marks=pytest.mark.slow), "dpo"])
def test_run_config_trains(name, tmp_path):
    extra = ["data.max_chars=100000"] if name in ("causal", "span") else ["data.n_examples=300"]
    cfg = load_run_config(name, [*FAST, *extra, f"out_dir={tmp_path}"])
    out = train(cfg, log=lambda *a: None)
    assert out["status"] == "done" and out["step"] == 6
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(lines[0])
    assert all(r["loss"] > 0 for r in lines) and out["eval_loss"] > 0
    if name == "dpo":
        assert "reward_acc" in lines[0]
    if name in ("causal", "sft", "dpo"):
        assert len(out["samples"]) == 1


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    cfg = load_run_config("sft", [*FAST, "data.n_examples=300", "optim.lr=1e9", "optim.warmup_steps=0",
                                  "optim.clip_norm=0", "train.steps=30", "train.ckpt_every=1", f"out_dir={tmp_path}"])
    with pytest.raises(NonFiniteError, match=r"non-finite (loss|grad_norm) at step (\d+).*Last good checkpoint") as e:
        train(cfg, log=lambda *a: None)
    bad_step = int(e.value.args[0].split(" at step ")[1].split()[0])
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and max(ckpts) < bad_step  # nothing written at or after the bad step


def test_skip_nonfinite_counts_skips(tmp_path):
    cfg = load_run_config("sft", [*FAST, "data.n_examples=300", "optim.lr=1e9", "optim.warmup_steps=0",
                                  "optim.clip_norm=0", "train.steps=12", "train.skip_nonfinite=true",
                                  f"out_dir={tmp_path}"])
    out = train(cfg, log=lambda *a: None)
    assert out["status"] == "done" and out["skipped"] > 0
