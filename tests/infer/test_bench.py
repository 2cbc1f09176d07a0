"""`jaxtx bench decode`: the argparse registration and a direct run() at a tiny size (no timing assertions)."""
import argparse
import re

from jaxtx.infer import bench


def test_run_tiny_prints_unrolled_and_scanned_rows(capsys):
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="target"))
    args = parser.parse_args(["decode", "tiny", "--set", "vocab_size=128", "d_model=32", "n_layers=2", "n_heads=4",
                              "n_kv_heads=2", "d_ff=64", "--batch", "1", "2", "--prompt-len", "8", "--new-tokens",
                              "4", "--repeats", "1", "--scan"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for system in ("jaxtx", "scanned"):
        for batch in (1, 2):  # system, batch, TTFT ms, tok/s, ms/step, roofline %
            row = re.compile(rf"^{system}\s+{batch}\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+\d+%")
            rates = [float(m.group(1)) for line in out.splitlines() if (m := row.match(line))]
            assert len(rates) == 1 and rates[0] > 0, (system, batch, out)
    assert out.count("unrolled is") == 2
