"""Several LoRA adapters stacked over one base (jaxtx.lora.stack_adapters): each row (or token) computes with its own
adapter, equal to applying that adapter alone; slot 0 is the base; bad stacks are refused."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtx.hf as hf
from jaxtx.lora import LoraConfig, add_lora, merge, stack_adapters, strip
from jaxtx.lora.dense import selected_delta, stacked_equations
from lora_testing import random_b

HF = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
IDS = jnp.asarray(np.random.default_rng(0).integers(2, 128, (4, 10)), jnp.int32)


# different ranks, targets and scales: the stack pads ranks and fills untargeted sites with zeros
CONFIGS = [LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
           LoraConfig(r=2, alpha=4, target_modules="all-linear", rank_pattern={"layers.1.mlp.down_proj": 6}),
           LoraConfig(r=8, alpha=4, target_modules=["o_proj", "up_proj"], rslora=True)]


def _adapted(model, params):
    return [random_b(add_lora(model, params, c, jax.random.key(10 + i)), seed=i, std=0.05)
            for i, c in enumerate(CONFIGS)]


@pytest.mark.parametrize("scan", [False, True])
def test_each_row_equals_its_single_adapter(scan):
    model, base = hf.load(HF / "llama", scan_layers=scan)
    singles = _adapted(model, base)
    served = stack_adapters(model, base, singles)
    if scan:  # layer axis first (nn.scan slices it), then the adapter slots
        q = served["layers"]["attn"]["q"]
        assert q["lora_a"].shape[:2] == (model.cfg.n_layers, 4) and q["lora_scale"].shape == (model.cfg.n_layers, 4)
    slots = jnp.asarray([2, 0, 3, 1], jnp.int32)
    got = model.apply({"params": served}, IDS, adapter_ids=slots)
    for row, slot in enumerate(np.asarray(slots)):
        p = base if slot == 0 else singles[slot - 1]
        want = model.apply({"params": p}, IDS[row:row + 1])[0]
        np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want), rtol=0,
                                   atol=2e-6 * float(jnp.abs(want).max()))
    base_logits = model.apply({"params": base}, IDS)
    for p in singles:  # every adapter changes the output, so the test can tell them apart
        assert float(jnp.abs(model.apply({"params": p}, IDS) - base_logits).max()) > 1e-2
    # per-token slots: a [B, T] array is taken as is (all tokens of a row on one slot == the per-row form)
    got_bt = model.apply({"params": served}, IDS, adapter_ids=jnp.broadcast_to(slots[:, None], IDS.shape))
    np.testing.assert_array_equal(np.asarray(got_bt), np.asarray(got))


def test_selected_delta_against_float64():
    """Per-token selection == each token's own scale * (x a_i) b_i in float64, ranks padded with zeros."""
    rng = np.random.default_rng(0)
    A, r = 3, 4
    x = rng.normal(size=(2, 5, 6))
    a = rng.normal(size=(A, 6, r))
    b = rng.normal(size=(A, r, 3, 2))
    a[1, :, 2:], b[1, 2:] = 0, 0  # adapter 1 has rank 2
    scale = np.array([0.0, 0.5, 2.0])
    ids = rng.integers(0, A, (2, 5))
    got = selected_delta("BTD,DNh->BTNh", 1, jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32),
                         jnp.asarray(b, jnp.float32), jnp.asarray(scale, jnp.float32), jnp.asarray(ids), jnp.float32)
    want = np.stack([np.stack([scale[i] * x[bb, t] @ a[i] @ b[i].reshape(r, -1) for t, i in enumerate(ids[bb])])
                     for bb in range(2)]).reshape(2, 5, 3, 2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert stacked_equations("BTHh,HhD->BTD", 2) == ("BTHh,aHhr->BTar", "BTar,arD->BTD")


def test_refusals():
    model, base = hf.load(HF / "llama", scan_layers=False)
    served = stack_adapters(model, base, _adapted(model, base)[:1])
    with pytest.raises(ValueError, match="stacked LoRA adapters.*adapter_ids"):
        model.apply({"params": served}, IDS)
    with pytest.raises(ValueError, match=r"adapter_ids: expected integer adapter slots of shape \[B, T\]"):
        model.apply({"params": served}, IDS, adapter_ids=jnp.zeros((3,), jnp.int32))
    other, other_base = hf.load(HF / "gpt2", scan_layers=False)  # another base: kernel shapes differ
    foreign = add_lora(other, other_base, LoraConfig(r=2, target_modules="all-linear"), jax.random.key(0))
    with pytest.raises(ValueError, match="another"):
        stack_adapters(model, base, [foreign])
    with pytest.raises(ValueError, match="no LoRA leaves"):
        stack_adapters(model, base, [base])
    with pytest.raises(ValueError, match="already hold a LoRA adapter"):
        stack_adapters(model, served, _adapted(model, base)[:1])
    assert jax.tree.structure(strip(served)) == jax.tree.structure(base)
    with pytest.raises(ValueError, match="several stacked adapters"):
        merge(model, served)


def test_stacked_over_a_quantized_base():
    """QLoRA-style serving: adapters stacked over an int8 base equal each adapter alone over the same base."""
    from jaxtx import quant
    from jaxtx.lora import adapters, combine
    model, base = hf.load(HF / "llama", scan_layers=False)
    qbase = quant.quantize_params(base, "int8")
    singles = [combine(qbase, adapters(p)) for p in _adapted(model, base)[:2]]
    slots = jnp.asarray([1, 0, 2, 1], jnp.int32)
    got = model.apply({"params": stack_adapters(model, qbase, singles)}, IDS, adapter_ids=slots)
    for row, slot in enumerate(np.asarray(slots)):
        want = model.apply({"params": qbase if slot == 0 else singles[slot - 1]}, IDS[row:row + 1])[0]
        np.testing.assert_allclose(np.asarray(got[row]), np.asarray(want), rtol=0,
                                   atol=2e-6 * float(jnp.abs(want).max()))
