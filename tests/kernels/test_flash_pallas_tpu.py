"""The TPU (Mosaic) Pallas flash kernel, run under `pltpu.force_tpu_interpret_mode` on CPU, against the reference.

The TPU interpreter is ~100x slower than jnp: shapes are tiny, the default run covers the mask features in a few
combined cases, and the full mask x shape matrix is marked slow.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_testutil import MASK_CASES, check_against_reference, fresh_key, make_qkv, mask_kwargs

from jaxtx.kernels import BlockSizes, attention
from jaxtx.kernels.flash_attention.tpu import flash_attention_tpu

BS = BlockSizes(8, 8)
SHAPE = (1, 20, 28, 2, 1, 8)  # T != S, not block multiples, GQA 2 (dk/dv accumulate over the group)


def _tpu(**kw):
    return lambda q, k, v: flash_attention_tpu(q, k, v, block_sizes=BS, **kw)


def _run_case(kw_fn, shape=SHAPE, dtype=jnp.float32):
    B, T, S, H, K, Hd = shape
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd, dtype)
    kw = kw_fn(jax.random.fold_in(key, 1), B, T, S, H)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        check_against_reference(_tpu(**kw), q, k, v, kw)


def _combined(key, B, T, S, H):
    """causal + window + ALiBi + key padding in one case."""
    kw = mask_kwargs("alibi_causal", key, B, T, S, H)
    kw.update(window=9, kv_segment_ids=mask_kwargs("kv_padding", key, B, T, S, H)["kv_segment_ids"])
    return kw


@pytest.mark.parametrize("case", ["causal", "combined"])  # segments: bf16_mqa here, all cases in the slow run
def test_tpu_interpret(case):
    _run_case(_combined if case == "combined" else (lambda key, *a: mask_kwargs(case, key, *a)))


def test_tpu_interpret_bf16_mqa():
    _run_case(lambda key, *a: mask_kwargs("segments_causal", key, *a), shape=(1, 24, 24, 2, 1, 16),
              dtype=jnp.bfloat16)


def test_tpu_via_dispatcher_interpret_flag():
    """backend='pallas_tpu', interpret=True (no force mode): passes InterpretParams to pallas_call."""
    B, T, S, H, K, Hd = 1, 16, 16, 2, 1, 8
    key = fresh_key()
    q, k, v = make_qkv(key, B, T, S, H, K, Hd)
    got = jax.jit(lambda *a: attention(*a, causal=True, backend="pallas_tpu", interpret=True, block_sizes=BS))(q, k, v)
    np.testing.assert_allclose(got, attention(q, k, v, causal=True, backend="xla"), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", MASK_CASES)
def test_tpu_interpret_all_mask_cases(case):
    _run_case(lambda key, *a: mask_kwargs(case, key, *a))


def test_tpu_masked_blocks_are_skipped_not_discarded():
    """NaN keys/values only in blocks that causal masking makes invisible to rows < 24: skipped -> finite."""
    B, T, S, H, K, Hd = 1, 32, 32, 1, 1, 8
    q, k, v = make_qkv(fresh_key(), B, T, S, H, K, Hd)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        got = jax.jit(_tpu(causal=True))(q, k.at[:, 24:].set(jnp.nan), v.at[:, 24:].set(jnp.nan))[:, :24]
    want = attention(q, k, v, causal=True, backend="xla")[:, :24]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
