"""jaxtx.lora on the params tree: zero b is the base, the adapter term against float64 numpy, merge == unmerged,
PEFT's target / rank / alpha pattern rules, refusals."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtx.hf as hf
from jaxtx.config import ConfigError
from jaxtx.lora import LoraConfig, add_lora, merge, resolve, split, strip
from jaxtx.lora.core import combine, delta
from jaxtx.lora.dense import adapter_equations

HF = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
IDS = jnp.asarray(np.random.default_rng(0).integers(2, 128, (2, 12)), jnp.int32)


def _random_b(params, std=0.05, seed=1):
    def f(path, x):
        if path[-1].key != "lora_b":
            return x
        return jax.random.normal(jax.random.fold_in(jax.random.key(seed), x.size + x.ndim), x.shape, x.dtype) * std
    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_zero_b_is_the_base_exactly(name):
    """Unrolled (op by op) the base computation is untouched and + 0 is exact. Scanned, XLA compiles the layer body
    with the extra dots and may fuse the base's differently: within float32 rounding there."""
    lc = LoraConfig(r=4, target_modules="all-linear")
    model, params = hf.load(HF / name, scan_layers=False)
    base = model.apply({"params": params}, IDS)
    out = model.apply({"params": add_lora(model, params, lc, jax.random.key(0))}, IDS)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
    model, params = hf.load(HF / name, scan_layers=True)
    base = model.apply({"params": params}, IDS)
    out = model.apply({"params": add_lora(model, params, lc, jax.random.key(0))}, IDS)
    np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-6, atol=1e-6 * float(jnp.abs(base).max()))


@pytest.mark.parametrize("eq,n_in,x_shape,k_shape", [
    ("BTD,DNh->BTNh", 1, (2, 3, 8), (8, 4, 2)),
    ("BTHh,HhD->BTD", 2, (2, 3, 4, 2), (4, 2, 8)),
    ("...i,io->...o", 1, (2, 3, 8), (8, 6)),
])
def test_adapter_term_against_float64(eq, n_in, x_shape, k_shape):
    """The two einsums Dense runs == x_flat @ a_flat @ b_flat * scale in float64."""
    rng = np.random.default_rng(0)
    r = 3
    x = rng.normal(size=x_shape)
    a = rng.normal(size=k_shape[:n_in] + (r,))
    b = rng.normal(size=(r,) + k_shape[n_in:])
    eq_a, eq_b = adapter_equations(eq, n_in)
    got = np.einsum(eq_b, np.einsum(eq_a, x, a), b) * 0.5
    n_batch = len(x_shape) - n_in
    xf = x.reshape(x_shape[:n_batch] + (-1,))
    want = (xf @ a.reshape(-1, r) @ b.reshape(r, -1) * 0.5).reshape(x_shape[:n_batch] + k_shape[n_in:])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(delta(a, b, 0.5)).reshape(-1),
                               (a.reshape(-1, r) @ b.reshape(r, -1) * 0.5).reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,scan", [("llama", True), ("llama", False), ("gpt2", True), ("mixtral", True)])
def test_merge_equals_unmerged(name, scan):
    model, params = hf.load(HF / name, scan_layers=scan)
    lc = LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"layers.0.self_attn.q_proj": 2},
                    rslora=True)
    p = _random_b(add_lora(model, params, lc, jax.random.key(0)))
    unmerged = model.apply({"params": p}, IDS)
    base = model.apply({"params": params}, IDS)
    merged_params = merge(model, p)
    assert jax.tree.structure(merged_params) == jax.tree.structure(params)
    merged = model.apply({"params": merged_params}, IDS)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapter does something
    scale = float(jnp.abs(unmerged).max())
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5 * scale, rtol=0)


def test_split_combine_strip():
    model, params = hf.load(HF / "llama")
    p = add_lora(model, params, LoraConfig(), jax.random.key(0))
    trainable, frozen = split(p)
    assert {k for path, _ in jax.tree_util.tree_leaves_with_path(trainable) for k in [path[-1].key]} == \
        {"lora_a", "lora_b"}
    assert jax.tree.structure(combine(frozen, trainable)) == jax.tree.structure(p)
    assert jax.tree.structure(strip(p)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="already hold a LoRA adapter"):
        add_lora(model, p, LoraConfig(), jax.random.key(0))


def test_target_and_pattern_rules():
    model, _ = hf.load(HF / "llama")
    cfg = model.cfg
    names = lambda lc: [s.name for s, _, _ in resolve(cfg, lc)]  # noqa: E731
    assert names(LoraConfig()) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert len(names(LoraConfig(target_modules="all-linear"))) == 2 * 7  # lm_head excluded, as PEFT does
    assert names(LoraConfig(target_modules=r".*\.1\.mlp\.down_proj")) == ["model.layers.1.mlp.down_proj"]
    assert names(LoraConfig(target_modules=["layers.0.self_attn.k_proj"])) == ["model.layers.0.self_attn.k_proj"]
    # PEFT: the first key matching (.*\.)?(key)$ wins; r and alpha patterns are independent
    lc = LoraConfig(r=8, alpha=16, target_modules="all-linear", rslora=False,
                    rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 4},
                    alpha_pattern={"mlp.up_proj": 5.0})
    got = {s.name: (r, scale) for s, r, scale in resolve(cfg, lc)}
    assert got["model.layers.1.self_attn.q_proj"] == (2, 8.0)
    assert got["model.layers.0.self_attn.q_proj"] == (4, 4.0)
    assert got["model.layers.0.mlp.up_proj"] == (8, 5.0 / 8)
    assert got["model.layers.0.self_attn.k_proj"] == (8, 2.0)
    lc_rs = LoraConfig(r=16, alpha=8, rslora=True)
    assert resolve(cfg, lc_rs)[0][2] == pytest.approx(8 / 4)
    # a rank pattern inside a scanned stack: padded to the largest rank, padding exactly zero
    model_s, params = hf.load(HF / "llama")
    p = add_lora(model_s, params, lc, jax.random.key(0))
    a = np.asarray(p["layers"]["attn"]["q"]["lora_a"])
    assert a.shape == (2, 64, 4) and np.all(a[1, :, 2:] == 0) and np.all(a[1, :, :2] != 0)


@pytest.mark.parametrize("fixture,target,match", [
    ("llama", "embed_tokens", "is an embedding"),
    ("llama", "lm_head", "is the output head"),
    ("mixtral", "w1", "MoE expert"),
    ("mixtral", "gate", "MoE expert/router"),
    ("gpt2", "q_proj", "matches no linear module .*c_attn"),
])
def test_unsupported_targets_are_refused(fixture, target, match):
    model, _ = hf.load(HF / fixture)
    with pytest.raises(ConfigError, match=match):
        resolve(model.cfg, LoraConfig(target_modules=[target]))


@pytest.mark.parametrize("kw,match", [({"r": 0}, "lora.r=0"), ({"alpha": -1.0}, "lora.alpha=-1.0"),
                                      ({"dropout": 1.0}, "lora.dropout=1.0"), ({"target_modules": []}, "non-empty"),
                                      ({"target_modules": "(("}, "not a valid regex"),
                                      ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0")])
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kw)


def test_dropout_only_in_training():
    """lora_dropout drops the adapter input when a "dropout" rng is given (training), never otherwise."""
    model, params = hf.load(HF / "llama", scan_layers=False)
    p = _random_b(add_lora(model, params, LoraConfig(r=4, dropout=0.5, target_modules="all-linear"),
                           jax.random.key(0)))
    plain = model.apply({"params": p}, IDS)
    again = model.apply({"params": p}, IDS, deterministic=True)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))
    dropped = model.apply({"params": p}, IDS, rngs={"dropout": jax.random.key(1)}, deterministic=False)
    assert float(jnp.abs(dropped - plain).max()) > 1e-3
