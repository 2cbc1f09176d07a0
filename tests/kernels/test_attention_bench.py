"""`jaxtx bench attention`: the argparse registration and a direct run() at a tiny size (no timing assertions)."""
import argparse

from jaxtx.kernels import bench


def _parse(argv):
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="target"))
    return parser.parse_args(["attention", *argv])


def test_run_tiny_prints_table_with_all_backends_and_modes(capsys):
    args = _parse(["--sizes", "32", "--batch", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                   "--iters", "1", "--interpret"])
    assert args.func is bench.run
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "TFLOP/s" in out and "vs xla" in out
    for backend in ("xla", "blockwise", "pallas_gpu (interpret)"):
        for mode in ("fwd", "fwd+bwd"):
            assert any(line.startswith(backend) and f" {mode} " in line and "n/a" not in line
                       for line in out.splitlines()), (backend, mode, out)


def test_flops_count_causal_pairs_once():
    full, full_train = bench.attention_flops(1, 8, 8, 1, 4, causal=False)
    causal, _ = bench.attention_flops(1, 8, 8, 1, 4, causal=True)
    assert full == 4 * 8 * 8 * 4 and full_train == 3.5 * full
    assert causal == 4 * 4 * (8 * 9 // 2)  # only the 36 visible pairs
