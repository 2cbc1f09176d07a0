"""Sizing formulas: equal to the real parameter trees, and the worked examples of the reference material."""
import jax
import numpy as np
import pytest

from jaxtx import model as model_lib
from jaxtx import sizing
from jaxtx.cli import main
from jaxtx.config import load_model_config, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_counts_equal_eval_shape_param_tree(name):
    cfg = load_model_config(name)
    real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model_lib.abstract_params(model_lib.build(cfg))))
    assert sizing.param_counts(cfg).total == real


def test_unrolled_and_moe_capacity_variants_count_the_same():
    cfg = load_model_config("mixtral-8x7b", ["n_layers=2", "scan_layers=false", "capacity_factor=1.25"])
    real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model_lib.abstract_params(model_lib.build(cfg))))
    assert sizing.param_counts(cfg).total == real


def test_354m_decoder_and_its_kv_cache():
    """24 layers, d=1024, V=50257, FFN 4096 (GPT-2 medium): ~354M params, ~0.75 GB fp16 KV at 8192 tokens."""
    cfg = load_model_config("gpt2-medium")
    assert sizing.param_counts(cfg).total == pytest.approx(354e6, rel=0.01)
    assert sizing.kv_cache_bytes(cfg, 8192, dtype="float16") == 2 * 24 * 1024 * 2 * 8192  # 0.75 GiB
    assert sizing.kv_cache_bytes(cfg, 8192, dtype="float16") / 2 ** 30 == pytest.approx(0.75)


def test_llama3_8b_kv_cache_is_128_kib_per_token():
    assert sizing.kv_cache_bytes_per_token(load_model_config("llama3-8b"), "float16") == 128 * 1024


def test_70b_kv_cache_at_32k_with_and_without_gqa():
    cfg = load_model_config("llama3-70b")
    assert sizing.kv_cache_bytes(cfg, 32768, dtype="float16") == 10 * 2 ** 30
    mha = cfg.replace(n_kv_heads=None)
    assert sizing.kv_cache_bytes(mha, 32768, dtype="float16") == 80 * 2 ** 30


def test_moe_active_parameters():
    cfg = load_model_config("mixtral-8x7b")
    c = sizing.param_counts(cfg)
    assert c.total == pytest.approx(46.7e9, rel=0.01) and c.active == pytest.approx(12.9e9, rel=0.01)


def test_flops_and_training_memory_closed_forms():
    cfg = load_model_config("tiny")
    n = sizing.matmul_params(cfg)
    assert sizing.flops_per_token(cfg, 512) == 2 * n + 2 * cfg.n_layers * 512 * cfg.d_model
    assert sizing.train_flops_per_token(cfg, 512) == 3 * sizing.flops_per_token(cfg, 512)
    m = sizing.train_memory_bytes(cfg)
    total = sizing.param_counts(cfg).total
    assert m["params"] == 4 * total and m["adam_moments"] == 8 * total and m["total"] == 16 * total


def test_chinchilla():
    n, d = sizing.chinchilla(5.76e23)  # Chinchilla's own budget: ~70B params, ~1.4T tokens
    assert n == pytest.approx(69.3e9, rel=0.01) and d == pytest.approx(1.386e12, rel=0.01)
    assert 6 * n * d == pytest.approx(5.76e23)
    with pytest.raises(ValueError, match="must be > 0"):
        sizing.chinchilla(0)


def test_info_cli(capsys):
    assert main(["info", "llama3-8b", "--seq-len", "8192", "--kv-dtype", "float16", "--compute", "1e21"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "128.00 KiB per token" in out and "Chinchilla" in out
    assert main(["info", "tiny", "n_layers=zero"]) == 2
    assert "n_layers='zero': expected int" in capsys.readouterr().err
    assert main(["info", "no-such-model"]) == 2
