"""`jaxtx aot` with a `lora:` section on one v5e chip (libtpu's compile-only devices on this CPU): the compiled step's
arguments are the frozen base plus adapters and their Adam moments, not the full model's params and moments; an NF4
base shrinks them further. The full-size Llama-3-8B numbers are in docs/benchmarks.md (minutes of compile each)."""
import importlib.util

import pytest

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed: no compile-only TPU devices", allow_module_level=True)

from jaxtx.cli import main  # noqa: E402
from jaxtx.train import aot  # noqa: E402

TOPO = "v5e:1x1"  # one 16 GiB chip: smaller than libtpu's default 2x2 host, needs explicit host bounds
ONE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1", "train.batch_size=2", "train.seq_len=128",
       "model.n_layers=2", "model.d_model=256", "model.d_ff=1024", "model.n_heads=4", "model.n_kv_heads=4",
       "model.vocab_size=1024"]
LORA = ["lora.r=8", "lora.alpha=16", "lora.target_modules=all-linear"]


@pytest.fixture(scope="module")
def devices():
    try:
        return aot.topology_devices(TOPO)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"compile-only TPU devices unavailable: {e}")


def _mem(devices, extra):
    compiled, info = aot.compile_train_step(aot.load_config("tiny", None, [*ONE, *extra]), devices)
    return aot.analyze(compiled, aot.hbm_bytes(TOPO, None)), info


def test_single_v5e_chip_topology(devices):
    assert len(devices) == 1 and aot.hbm_bytes(TOPO, None) == 16 * 2**30


def test_lora_and_qlora_arguments_hold_base_plus_adapter_state(devices, capsys):
    full, info_f = _mem(devices, [])
    lo, info_l = _mem(devices, LORA)
    q, info_q = _mem(devices, [*LORA, "lora.quantize=nf4"])
    n, n_lo = info_f["n_params"], info_l["lora"]["trained"]
    assert info_l["n_params"] == n and 0 < n_lo < 0.1 * n  # the model is the base; the adapters are a few percent
    batch = 2 * 2 * 128 * 4  # tokens + segment ids, int32
    # full: f32 params + Adam mu, nu = 12 bytes per param; LoRA: the f32 base + 12 bytes per adapter param
    assert 0.98 * 12 * n < full["arguments"] - batch < 1.02 * 12 * n + 2**16
    assert info_l["lora"]["base_bytes"] == 4 * n
    assert 0.98 * (4 * n + 12 * n_lo) < lo["arguments"] - batch < 1.02 * (4 * n + 12 * n_lo) + 2**16
    # NF4 base: the matrices at ~4.5 bits; the embedding and head stay f32 (jaxtx.quant's default skip)
    assert info_q["lora"]["base_bytes"] < 0.6 * info_l["lora"]["base_bytes"]
    assert q["arguments"] < lo["arguments"] - 0.4 * info_l["lora"]["base_bytes"]
    aot.report(TOPO, 1, info_q, q)
    out = capsys.readouterr().out
    assert "LoRA:" in out and "frozen base nf4" in out


def test_cli_single_chip_lora(capsys):
    assert main(["aot", "tiny", "--topology", TOPO, *ONE, *LORA, "lora.quantize=nf4"]) == 0
    out = capsys.readouterr().out
    assert "topology v5e:1x1: 1 chips" in out and "fits" in out
