"""Run metrics: metrics.jsonl / eval.jsonl (one JSON object per logged step), TensorBoard events, loss.png, and MFU.

A resumed run first drops the lines past its checkpoint step, so after any kill + resume the files read exactly as
if the run had never stopped. Lines are flushed as written: a SIGKILL loses at most the line being written.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxtx import sizing
from jaxtx.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor numbers). Matched by substring of device_kind, longest key first.
PEAK_FLOPS = {
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
    "TPU v4": 275e12, "TPU v3": 123e12, "TPU v2": 45e12,
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
}


@functools.lru_cache(maxsize=None)
def cpu_matmul_peak(n: int = 2048, reps: int = 5, clock=time.perf_counter) -> float:
    """Measured f32 n^3 matmul FLOPs per second of `clock` (best of reps): wall-clock FLOP/s of this host, the CPU
    'peak' MFU is reported against; with time.process_time, FLOPs per CPU-second of this process."""
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = clock()
        f(a).block_until_ready()
        best = min(best, clock() - t)
    return 2 * n ** 3 / best


def device_peak_flops(device=None) -> float:
    """Peak FLOP/s of one device: the table for TPU/GPU chips, a measured matmul for CPU (shared by all CPU devices)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return cpu_matmul_peak()
    kind = device.device_kind
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return PEAK_FLOPS[key]
    return float("nan")


def total_peak_flops(devices) -> float:
    """All CPU 'devices' share one host's cores, so the peak is the host's; accelerators add up."""
    devices = list(devices)
    if devices[0].platform == "cpu":
        return cpu_matmul_peak()
    return sum(device_peak_flops(d) for d in devices)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token that MFU is measured against: jaxtx.sizing's count (the one `jaxtx info`
    prints), so the two never disagree."""
    return float(sizing.train_flops_per_token(cfg, seq_len))


def _truncate(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a half-written last line from a killed process
    path.write_text("".join(k + "\n" for k in keep))


def _summary_writer_class():
    """tensorboardX.SummaryWriter without importing torch: tensorboardX tries `import torch` at import time only to
    accept torch tensors (we log floats), and that import costs ~3 s per process when torch is installed."""
    import sys
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """metrics.jsonl / eval.jsonl / TensorBoard. Only process 0 of a multi-process run writes (enabled=True)."""

    def __init__(self, run_dir: str | Path, start_step: int, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.files, self.tb = {}, None
        if not enabled:
            return
        self.dir = Path(run_dir)
        self.paths = {"train": self.dir / "metrics.jsonl", "eval": self.dir / "eval.jsonl"}
        for p in self.paths.values():
            _truncate(p, start_step)
        self.files = {k: open(p, "a") for k, p in self.paths.items()}
        self.tb = None
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, kind: str, record: dict) -> None:
        if not self.enabled:
            return
        f = self.files[kind]
        f.write(json.dumps(record) + "\n")
        f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and np.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def plot_losses(run_dir: str | Path, unigram_entropy: float | None = None) -> Path:
    """loss.png: train loss per logged step and eval loss at each eval, against the unigram-entropy baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    tr, ev = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train", lw=1)
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="gray", ls="--", label=f"unigram entropy {unigram_entropy:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
