"""Run config: dotted overrides, clear errors before anything compiles, every shipped run config parses."""
import pytest
from train_helpers import TINY_MODEL, run_cfg

from jaxtx.config import ConfigError, configs_dir
from jaxtx.train.config import load_run_config


def test_overrides_and_resolved_dict():
    cfg = load_run_config("configs/tiny.yaml", ["train.steps=7", "model.n_layers=2", "optim.lr=1e-4", "out_dir=x",
                                                "mesh.fsdp=2"])
    assert cfg.train.steps == 7 and cfg.model_config().n_layers == 2 and cfg.optim.lr == 1e-4 and cfg.out_dir == "x"
    assert cfg.mesh.fsdp == 2
    d = cfg.to_dict()
    assert d["model"]["preset"] == "tiny" and d["model"]["d_model"] == 256 and d["train"]["steps"] == 7


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", "did you mean 'steps'"),
    ("train.steps=abc", "train|steps"),
    ("train.objective=gan", "objective"),
    ("trian.steps=3", "unknown key"),
    ("train.seq_len=4096", "position limit"),
    ("optim.grad_accum=3", "grad_accum"),
    ("model.n_layerz=2", "n_layers"),
    ("train.objective=mlm", "kind 'encoder'"),
    ("train.objective=sft", "data.source=jsonl"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("configs/tiny.yaml", [override])


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    """8 fake devices, data=-1 -> dp 8: a batch of 4 is refused before any compile."""
    from jaxtx.train.loop import check_batch, make_run_mesh
    cfg = load_run_config(None, [*TINY_MODEL, "train.seq_len=64", "train.batch_size=4", "mesh.data=-1"])
    mesh, rules = make_run_mesh(cfg)
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        check_batch(cfg, mesh, rules)
    check_batch(load_run_config(None, [*TINY_MODEL, "train.seq_len=64", "train.batch_size=16", "mesh.data=-1"]),
                mesh, rules)


def test_every_shipped_run_config_parses():
    paths = [configs_dir() / "tiny.yaml", *sorted((configs_dir() / "runs").glob("*.yaml"))]
    assert len(paths) >= 6  # tiny + one per objective
    for p in paths:
        cfg = load_run_config(p)
        assert cfg.train.steps > 0, p


def test_unknown_objective_in_loss_builder():
    from jaxtx.train.objectives import make_objective
    cfg = run_cfg([])
    with pytest.raises(ValueError, match="objective"):
        make_objective(None, cfg.model_config(), cfg.train.__class__(objective="gan"))  # bypasses config checks
