"""`jaxtx bench quant` runs end to end on a tiny random model and prints one row per scheme asked for."""
from pathlib import Path

from jaxtx.cli import main

FIX = Path(__file__).parents[1] / "fixtures" / "hf"


def test_bench_quant_smoke(capsys):
    assert main(["bench", "quant", "--hf", str(FIX / "llama"), "--seqs", "2", "--seq-len", "16", "--batch", "1",
                 "--new-tokens", "4", "--repeats", "1", "--schemes", "f32,int8,nf4"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| scheme")]
    assert [r.split("|")[1].strip() for r in rows] == ["f32", "int8", "nf4"]
    f32, int8 = rows[0].split("|"), rows[1].split("|")
    assert f32[5].strip() == "+0.00%" and float(f32[6]) == 1.0
    assert float(int8[3]) < 0.5  # int8 matrices: under half of the f32 bytes (embeddings/head kept in f32)


def test_bench_quant_bad_scheme(capsys):
    assert main(["bench", "quant", "--config", "tiny", "--schemes", "int3"]) == 2
    assert "--schemes: unknown ['int3']" in capsys.readouterr().err
