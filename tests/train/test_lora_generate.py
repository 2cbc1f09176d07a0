"""A LoRA run dir is a model: `jaxtx generate --run RUN` and `jaxtx convert --from-jaxtx RUN` load its recorded base
(checked against the base fingerprint the run recorded) with the run's adapter, and refuse (exit 2, nothing written)
when the base changed or is gone."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import ONE_DEVICE, TINY_MODEL, run_cfg

import jaxtx.model as model_lib
from jaxtx import quant
from jaxtx import run_dir as rd
from jaxtx.cli import main

LORA = ["lora.r=4", "lora.alpha=8", "lora.target_modules=all-linear"]
TRAIN = ["data.source=synthetic", "train.batch_size=4", "train.seq_len=16", "train.steps=3", "train.ckpt_every=3",
         "train.eval_every=0", "train.progress=false", "train.samples=0", "train.async_ckpt=false", "optim.lr=3e-2",
         "optim.warmup_steps=0", "optim.decay=constant"]
PROMPT = [5, 6, 7, 8]
N_NEW = 6


def _base(path):
    """A jaxtx model folder holding a random tiny base (std 0.2 kernels so greedy decoding does not collapse)."""
    cfg = run_cfg([]).model_config()
    model = model_lib.build(cfg)
    from jaxtx.train.step import init_params
    params = init_params(model, cfg, jax.random.key(7))
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype) if "kernel" in jax.tree_util.keystr(p) else x,
        params)
    rd.write_model(path, cfg, params)
    return cfg, params


def _train(tmp_path, extra=()):
    base_dir = tmp_path / "base"
    cfg, base = _base(base_dir)
    out = tmp_path / "run"
    rc = main(["train", "configs/tiny.yaml", *TINY_MODEL, *ONE_DEVICE, *LORA, *TRAIN, *extra,
               f"train.init_from={base_dir}", f"out_dir={out}"])
    assert rc == 0
    return cfg, base, base_dir, out


def _adapted(cfg, base, run, quantize=None):
    """The base with the run's adapter merged in float64 numpy, from the checkpoint's raw arrays (not through
    run_dir): kernel + alpha / r * a b; a QLoRA base is first NF4-rounded as training saw it."""
    adapters = ocp.PyTreeCheckpointer().restore((run / "checkpoints" / "3" / "state").absolute())["params"]
    if quantize:
        from jaxtx.lora.qlora import quantize_base
        base = jax.tree.map(lambda x: quant.dequantize(x, jnp.float32) if quant.is_quantized(x) else x,
                            quantize_base(base, quantize), is_leaf=quant.is_quantized)

    def walk(p, ad):
        out = {k: walk(v, ad.get(k, {})) if isinstance(v, dict) else v for k, v in p.items()}
        if "lora_a" in ad:
            k, a, b = (np.asarray(x, np.float64) for x in (p["kernel"], ad["lora_a"], ad["lora_b"]))
            n_stack = a.ndim + b.ndim - 2 - k.ndim
            st = a.shape[:n_stack]
            d = np.matmul(a.reshape(st + (-1, a.shape[-1])), b.reshape(st + (b.shape[n_stack], -1)))
            out["kernel"] = jnp.asarray(k + 8 / 4 * d.reshape(k.shape), jnp.float32)
        return out
    merged = walk(base, adapters)
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(adapters))  # the adapter trained
    return merged


def _greedy(cfg, params):
    """Greedy continuation of PROMPT by full forward passes (causal: logits at n-1 of a padded row)."""
    model = model_lib.build(cfg)
    last = jax.jit(lambda p, row, n: model.apply({"params": p}, row[None])[0, n - 1].argmax())
    ids = list(PROMPT)
    for _ in range(N_NEW):
        ids.append(int(last(params, jnp.asarray(ids + [0] * (len(PROMPT) + N_NEW - len(ids))), len(ids))))
    return ids[len(PROMPT):]


def _generate(run, capsys):
    """(exit code, printed text or stderr) of `jaxtx generate --run RUN` from PROMPT's ids."""
    rc = main(["generate", "--run", str(run), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
               str(N_NEW)])
    out = capsys.readouterr()
    return rc, out.out.strip() if rc == 0 else out.err


def _text(run, tokens):
    """What generate prints for these greedy tokens: cut at the run tokenizer's EOS, decoded."""
    from jaxtx.tokenizer import TextTokenizer
    tok = TextTokenizer.from_file(rd.tokenizer_file(run))
    if tok.eos_id in tokens:
        tokens = tokens[:tokens.index(tok.eos_id)]
    return tok.decode(tokens).strip()


def _listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_generate_from_a_lora_run_dir_and_refuse_a_changed_base(tmp_path, capsys):
    cfg, base, base_dir, run = _train(tmp_path)
    rec = json.loads((run / rd.LORA_BASE).read_text())
    assert rec["kind"] == "jaxtx" and rec["step"] == 0 and rec["path"] == str(base_dir.absolute())
    capsys.readouterr()
    rc, tokens = _generate(run, capsys)
    assert rc == 0, tokens
    assert tokens == _text(run, _greedy(cfg, _adapted(cfg, base, run))) != _text(run, _greedy(cfg, base))

    # convert --from-jaxtx of the run: the merged model, as HF weights
    assert main(["convert", "--from-jaxtx", str(run), "--to-hf", "--to", str(tmp_path / "hf")]) == 0
    import jaxtx.hf as hf
    _, hf_params = hf.load(tmp_path / "hf")
    ids = jnp.asarray([PROMPT + [9, 10, 11]])
    want = model_lib.build(cfg).apply({"params": _adapted(cfg, base, run)}, ids)
    np.testing.assert_allclose(np.asarray(model_lib.build(cfg).apply({"params": hf_params}, ids)), np.asarray(want),
                               atol=1e-4, rtol=1e-4)

    # the base altered in place (one kernel nudged): refused, both fingerprints named, nothing written
    altered = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 1.001 if jax.tree_util.keystr(p).endswith("['kernel']") else x, base)
    shutil.rmtree(base_dir)
    rd.write_model(base_dir, cfg, altered)
    before = _listing(tmp_path)
    capsys.readouterr()
    rc, err = _generate(run, capsys)
    assert rc == 2 and rec["fingerprint"] in err and rd.base_fingerprint(altered) in err, err
    assert "Traceback" not in err
    assert main(["convert", "--from-jaxtx", str(run), "--to-hf", "--to", str(tmp_path / "hf2")]) == 2
    assert _listing(tmp_path) == before

    # the base gone: refused, naming it
    shutil.rmtree(base_dir)
    capsys.readouterr()
    rc, err = _generate(run, capsys)
    assert rc == 2 and str(base_dir.absolute()) in err and "not there" in err, err


@pytest.mark.slow  # a second LoRA training run (~60 s on a loaded 2-core machine); the float case covers CI
def test_qlora_run_generates_with_the_nf4_base_it_trained_on(tmp_path, capsys):
    """A QLoRA run's base is NF4-quantized again as training did (QTensor kernels in the loaded params), and the
    adapter is applied unmerged over it: greedy tokens equal the NF4-rounded base with the adapter merged."""
    cfg, base, _, run = _train(tmp_path, ["lora.quantize=nf4"])
    _, params, _ = rd.load_params(run)
    assert any(quant.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))
    capsys.readouterr()
    rc, tokens = _generate(run, capsys)
    assert rc == 0, tokens
    assert tokens == _text(run, _greedy(cfg, _adapted(cfg, base, run, quantize="nf4")))


def test_random_init_base_is_rebuilt_from_the_seed(tmp_path):
    """Without train.init_from the base is the run's own random init: load_params rebuilds it from train.seed and
    gives the very params training ended with."""
    from jaxtx.train.loop import train
    out = tmp_path / "run"
    res = train(run_cfg([*LORA, *TRAIN, f"out_dir={out}"]), log=lambda *a, **k: None)
    assert json.loads((out / rd.LORA_BASE).read_text())["kind"] == "init"
    _, params, step = rd.load_params(out)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, res["params"]),
                 jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("version", [1, 2])
def test_fingerprint_sees_any_change(version):
    x = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7, "b": jnp.ones((5,), jnp.bfloat16)}
    f = rd.base_fingerprint(x, version)
    assert f == rd.base_fingerprint(jax.tree.map(jnp.copy, x), version)
    assert f != rd.base_fingerprint({**x, "a": x["a"].at[2, 1].add(1e-3)}, version)
    assert f != rd.base_fingerprint({**x, "a": x["a"].T.reshape(3, 4)}, version)  # same values, other places


@pytest.mark.slow  # a third LoRA training run (~70 s on a loaded 2-core machine)
def test_hf_folder_base(tmp_path, capsys):
    """train.init_from an HF folder: lora_base.json records it, generate loads it again (tokens = the HF base with
    the adapter merged), and a changed safetensors file is refused."""
    import jaxtx.hf as hf
    cfg, base = _base(tmp_path / "jaxtx_base")
    src = tmp_path / "hf_base"
    hf.save(cfg, base, src)
    run = tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", *TINY_MODEL, *ONE_DEVICE, *LORA, *TRAIN, f"train.init_from={src}",
                 f"out_dir={run}"]) == 0
    rec = json.loads((run / rd.LORA_BASE).read_text())
    assert rec["kind"] == "hf" and rec["path"] == str(src.absolute())
    capsys.readouterr()
    rc, text = _generate(run, capsys)
    assert rc == 0 and text == _text(run, _greedy(cfg, _adapted(cfg, base, run))), text
    hf.save(cfg, jax.tree.map(lambda x: x * 1.01, base), tmp_path / "changed")
    shutil.copyfile(tmp_path / "changed" / "model.safetensors", src / "model.safetensors")
    rc, err = _generate(run, capsys)
    assert rc == 2 and rec["fingerprint"] in err, err


def test_fingerprint_does_not_depend_on_sharding():
    """Version 2 sums bits in uint32 (exact in any order): the base sharded over every device (the tests' fake CPU
    devices) fingerprints as the same arrays on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    x = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(16, 24)), jnp.float32)}
    mesh = Mesh(np.array(jax.devices()), ("d",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("d" if 16 % len(jax.devices()) == 0 else None)))
    assert rd.base_fingerprint(sharded) == rd.base_fingerprint(jax.device_put(x, jax.devices()[0]))


def test_a_second_adapter_over_a_lora_run_is_refused(tmp_path, capsys):
    """--run LORA_RUN --lora DIR: refused before loading, saying how to stack adapters (merge first)."""
    run = tmp_path / "run"
    rd.write_model(run, run_cfg([]).model_config(), {})  # any run dir with a lora_base.json is a LoRA run
    (run / rd.LORA_BASE).write_text(json.dumps({"source": "x", "fingerprint": "0"}))
    assert main(["generate", "--run", str(run), "--lora", str(tmp_path), "--prompt-ids", "5"]) == 2
    err = capsys.readouterr().err
    assert "is a LoRA run" in err and "merge this one first" in err and "Traceback" not in err
