"""`jaxtx bench train` with a `lora:` section: the LoRA step beside full fine-tuning of the same model in the same
process, with the trainable share and the compiled step's memory."""
import dataclasses
import re

from train_helpers import ONE_DEVICE, TINY_MODEL

from jaxtx.train.bench import _row, jax_stepper, lora_vs_full, time_alternating
from jaxtx.train.config import load_run_config

ARGS = [*TINY_MODEL, *ONE_DEVICE, "train.batch_size=4", "train.seq_len=32", "lora.r=4", "lora.alpha=8",
        "lora.target_modules=all-linear"]


def test_bench_train_lora_vs_full(capsys):
    cfg = load_run_config("configs/tiny.yaml", ARGS)
    (lo_step, lo), (full_step, full) = jax_stepper(cfg), jax_stepper(dataclasses.replace(cfg, lora=None))
    t_lo, t_full = time_alternating([lo_step, full_step], 1)
    lo, full = _row(lo, t_lo, cfg, lo), _row(full, t_full, cfg, lo)
    lora_vs_full(cfg, lo, full)
    out = capsys.readouterr().out
    # trainable: r (in + out) per adapted matrix (q, k, v, o, gate, up, down), over the model's params
    m = cfg.model_config()
    d, f, hd = m.d_model, m.d_ff, m.d_model // m.n_heads
    q, kv = m.n_heads * hd, m.n_kv_heads * hd
    assert lo["params"] == 4 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)) * m.n_layers
    assert full["params"] == full["model_params"] == lo["model_params"]
    # arguments: full = f32 params + Adam's two moments (12 bytes per param); LoRA = the f32 base + adapter state
    n, n_lo = lo["model_params"], lo["params"]
    assert 12 * n <= full["arg_bytes"] < 12 * n + 2**16
    assert 4 * n + 12 * n_lo <= lo["arg_bytes"] < 4 * n + 12 * n_lo + 2**16
    assert lo["peak_bytes"] < full["peak_bytes"]
    share = f"{100 * n_lo / n:.2f}%"
    assert re.search(r"full fine-tune +[\d.]+ +[\d.]+M \(100\.00%\)", out), out
    assert re.search(rf"LoRA r4 all-linear +[\d.]+ +[\d.]+M \({re.escape(share)}\)", out), out
    assert "LoRA / full: step time" in out


def test_time_alternating_runs_the_systems_in_turn():
    calls = []
    timings = time_alternating([lambda: calls.append("a"), lambda: calls.append("b")], 3)
    assert calls == ["a", "b"] * 4  # one warmup round, then three timed ones
    assert len(timings) == 2 and all(w >= 0 and c >= 0 for w, c in timings)
