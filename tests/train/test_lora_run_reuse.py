"""A `jaxtx train` LoRA run dir used where a model or an adapter goes: `jaxtx serve --lora NAME=RUN_DIR` puts the
run's adapter over the served base (which must be the base the run recorded: else exit 2 naming both fingerprints),
and `train.init_from=RUN_DIR` starts a full run from the run's merged weights (base + adapter)."""
import argparse
import shutil

import jax
import numpy as np
import pytest
from test_lora_generate import N_NEW, PROMPT, TRAIN, _train
from train_helpers import ONE_DEVICE, TINY_MODEL, run_cfg

import jaxtx.model as model_lib
from jaxtx import lora
from jaxtx import run_dir as rd
from jaxtx.cli import main
from jaxtx.config import ConfigError


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(model config, base params, base dir, LoRA run dir): a 3-step LoRA run on a jaxtx base folder. The base
    gets the run's tokenizer: `serve --run` needs one, and no tokenizer file is part of the base's fingerprint."""
    cfg, base, base_dir, run = _train(tmp_path_factory.mktemp("lora"))
    shutil.copyfile(run / rd.TOKENIZER, base_dir / rd.TOKENIZER)
    return cfg, base, base_dir, run


def _serve_args(argv):
    from jaxtx.infer.server import cli
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_a_lora_run_dir_over_its_recorded_base(lora_run, tmp_path, capsys):
    from jaxtx.infer import generate
    from jaxtx.infer.engine import Engine, EngineConfig
    from jaxtx.infer.server import cli
    cfg, base, base_dir, run = lora_run
    # the serve CLI's own loading (parse --lora, load the base, for_decoding, read each adapter), then its engine
    name, loras, _, _, model, params, adapters, what = cli.load(_serve_args(["--run", str(base_dir), "--lora",
                                                                            f"tuned={run}"]))
    assert loras == [("tuned", run)] and what["tuned"] == "LoRA run, step 3"
    eng = Engine(model, params, EngineConfig(max_seqs=2, page_size=8, num_pages=16, max_tokens_per_step=16,
                                             decode_steps=1, max_logprobs=0), adapters=adapters, warmup=False)
    got = eng.generate([PROMPT, PROMPT], max_new_tokens=N_NEW, adapter=["tuned", None]).tokens
    want = generate(model_lib.build(cfg), rd.load_params(run)[1], [PROMPT], max_new_tokens=N_NEW).tokens[0]
    assert got[0] == want != got[1]  # the adapter's request (the base's: test_engine_lora)

    # the same adapter over another base (one kernel nudged): exit 2 before any compile, one line naming both
    other = tmp_path / "other"
    altered = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.001 if jax.tree_util.keystr(p).endswith("['kernel']") else x, base)
    rd.write_model(other, cfg, altered)
    shutil.copyfile(run / rd.TOKENIZER, other / rd.TOKENIZER)
    recorded = rd.lora_base_record(run)["fingerprint"]
    capsys.readouterr()
    assert main(["serve", "--run", str(other), "--lora", f"tuned={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--lora tuned={run}" in err and recorded in err and rd.base_fingerprint(altered) in err, err
    assert "serve that base" in err and err.count("\n") == 0, err

    # a full model's run dir is not an adapter
    assert main(["serve", "--run", str(other), "--lora", f"x={base_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a whole model, not an adapter" in err and err.count("\n") == 0, err


def test_init_from_a_lora_run_starts_from_its_merged_weights(lora_run, tmp_path):
    """A full run (no lora section) from a LoRA run dir: its checkpoint 1, taken after a step at lr 0 (warmup starts
    at 0), holds exactly the LoRA run's base with the adapter merged; another model shape is refused first."""
    from jaxtx.train.loop import train
    cfg, base, _, run = lora_run
    merged = rd.load_params(run, merge=True)[1]
    assert not lora.has_lora(merged)
    out = tmp_path / "full"
    steps = [a for a in TRAIN if not a.startswith(("train.steps", "train.ckpt_every", "optim.warmup_steps"))]
    rc = main(["train", "configs/tiny.yaml", *TINY_MODEL, *ONE_DEVICE, *steps, "train.steps=2", "train.ckpt_every=1",
               "optim.warmup_steps=1", f"train.init_from={run}", f"out_dir={out}"])
    assert rc == 0
    assert rd.lora_base_record(out) is None and (out / rd.TOKENIZER).read_bytes() == (run / rd.TOKENIZER).read_bytes()
    _, start, _ = rd.load_params(out, 1)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, start), jax.tree.map(np.asarray, merged))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(base)))

    with pytest.raises(ConfigError, match=r"the LoRA run's merged weights .* do not fit the model config: .*kernel"
                                          r".*; set model\.\* to that run's"):
        train(run_cfg(["model.d_ff=256", f"train.init_from={run}", f"out_dir={tmp_path / 'wide'}"]),
              log=lambda *a, **k: None)
    assert not (tmp_path / "wide").exists()


@pytest.mark.slow  # a second LoRA training run (~40 s on a loaded 2-core machine)
def test_lora_run_on_a_lora_run(lora_run, tmp_path):
    """train.init_from=LORA_RUN with a lora section: the new adapter trains over the first run's merged weights,
    and load_params of the new run rebuilds exactly that base (through the first run's own base and record)."""
    from test_lora_generate import LORA
    cfg, _, _, run = lora_run
    out = tmp_path / "second"
    assert main(["train", "configs/tiny.yaml", *TINY_MODEL, *ONE_DEVICE, *LORA, *TRAIN, f"train.init_from={run}",
                 f"out_dir={out}"]) == 0
    rec = rd.lora_base_record(out)
    assert rec["kind"] == "jaxtx" and rec["path"] == str(run.absolute()) and rec["step"] == 3
    merged = rd.load_params(run, merge=True)[1]
    assert rec["fingerprint"] == rd.base_fingerprint(merged)
    base = lora.strip(rd.load_params(out)[1])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), jax.tree.map(np.asarray, merged))
