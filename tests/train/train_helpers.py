"""Shared tiny configs for the train tests (imported by name: pytest puts this folder on sys.path)."""
import os
import subprocess
import sys
from pathlib import Path

from jaxtx.train.config import load_run_config

# 2 layers, width 64, vocab 512: compiles in seconds, learns small synthetic tasks in tens of steps.
TINY_MODEL = ["model.preset=tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
              "model.d_ff=128", "model.vocab_size=512", "model.max_seq_len=128"]
TINY_BERT = ["model.preset=bert-base", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=128",
             "model.vocab_size=512", "model.max_seq_len=128", "model.dropout=0.0"]
TINY_T5 = ["model.preset=t5-small", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.head_dim=16",
           "model.d_ff=128", "model.vocab_size=512", "model.max_seq_len=128", "model.dropout=0.0"]
ONE_DEVICE = ["mesh.data=1"]  # tests run with 8 fake CPU devices; most train tests want the plain 1-device path


def run_cfg(extra, model=TINY_MODEL, path=None):
    return load_run_config(path, [*model, *ONE_DEVICE, "train.seq_len=64", *extra])


ROOT = Path(__file__).resolve().parents[2]


def run_cli(args, cwd=None, timeout=600, popen=False):
    """`python -m jaxtx.train ARGS` in a subprocess with one CPU device (the product's own environment)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "jaxtx.train", *args]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
