"""`jaxtx bench serve`: argparse registration and a direct run() at a tiny size (no timing assertions)."""
import argparse
import re

from jaxtx.infer.engine import bench


def test_bench_serve_tiny_prints_every_row(capsys):
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="target"))
    args = parser.parse_args(["serve", "tiny", "--set", "vocab_size=128", "d_model=32", "n_layers=2", "n_heads=4",
                              "n_kv_heads=2", "d_ff=64", "--requests", "6", "--prompt-len", "4", "30",
                              "--output-len", "2", "9", "--max-seqs", "4", "--page-size", "8",
                              "--max-tokens-per-step", "32", "--decode-steps", "4", "--rate", "50",
                              "--shared-prefix", "40", "--prefix-requests", "3", "--lora", "2", "--lora-rank", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for name in ("engine offline k=4", "lora x2 r=2 k=4", "engine poisson 50/s", "static generate"):
        m = re.search(rf"^{name}\s+([\d.]+)\s+[\d.]+\s+\d+ms", out, re.M)
        assert m and float(m.group(1)) > 0, (name, out)
    assert re.search(r"engine offline / static batching: [\d.]+x", out)
    assert re.search(r"2 LoRA adapters \(rank 2, all-linear\) mixed in every batch / base only: [\d.]+x", out)
    assert re.search(r"TTFT p50 \d+ ms with prefix caching, \d+ ms without", out)


def test_bench_serve_refuses_bad_flags(capsys):
    import pytest
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="target"))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "tiny", "--requests", "0"])
    assert "argument --requests: 0 is not >= 1" in capsys.readouterr().err
    args = parser.parse_args(["serve", "tiny", "--prompt-len", "9", "3"])
    with pytest.raises(ValueError, match="--prompt-len 9 3: MIN must be <= MAX"):
        args.func(args)
