"""`jaxtx convert --lora DIR [--merge]` and `jaxtx generate --lora DIR` against the PEFT fixtures."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxtx.hf as hf
import jaxtx.model as model_lib
from jaxtx.cli import main
from jaxtx.lora import load_peft

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def test_convert_merge_gives_peft_logits(tmp_path):
    assert main(["convert", "--from-hf", str(FIX / "hf" / "llama"), "--lora", str(FIX / "peft" / "llama"), "--merge",
                 "--to", str(tmp_path / "merged")]) == 0
    exp = np.load(FIX / "peft" / "llama" / "expected.npz")
    cfg, params = hf.load_jaxtx(tmp_path / "merged")
    logits = model_lib.build(cfg).apply({"params": params}, jnp.asarray(exp["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=1e-4, rtol=1e-4)


def test_convert_without_merge_writes_the_adapter_beside(tmp_path):
    assert main(["convert", "--from-hf", str(FIX / "hf" / "llama"), "--lora", str(FIX / "peft" / "llama"),
                 "--to", str(tmp_path / "out")]) == 0
    cfg, base = hf.load_jaxtx(tmp_path / "out")
    model = model_lib.build(cfg)
    _, params = load_peft(model, base, tmp_path / "out" / "adapter")
    exp = np.load(FIX / "peft" / "llama" / "expected.npz")
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(exp["input_ids"]))),
                               exp["logits"], atol=1e-4, rtol=1e-4)


def test_convert_merge_without_lora_is_refused(tmp_path, capsys):
    code = main(["convert", "--from-hf", str(FIX / "hf" / "llama"), "--merge", "--to", str(tmp_path / "x")])
    assert code != 0 and "--merge needs --lora" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_generate_with_lora_is_greedy_of_base_plus_adapter(capsys):
    """`generate --lora` continues greedily as base + adapter does (and not as the base does)."""
    args = ["generate", "--hf", str(FIX / "hf" / "llama"), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6"]
    assert main([*args, "--lora", str(FIX / "peft" / "llama")]) == 0
    lora_out = capsys.readouterr().out.split()
    model, base = hf.load(FIX / "hf" / "llama")
    _, params = load_peft(model, base, FIX / "peft" / "llama")
    # causal: logits at position n-1 of a row padded to 10 are those of the first n tokens (one compiled shape)
    last = jax.jit(lambda p, row, n: model.apply({"params": p}, row[None])[0, n - 1].argmax())

    def greedy(p):
        ids = [5, 6, 7, 8]
        for _ in range(6):
            ids.append(int(last(p, jnp.asarray(ids + [0] * (10 - len(ids))), len(ids))))
        return [str(i) for i in ids[4:]]
    assert lora_out == greedy(params) != greedy(base)
