"""Lowering proofs without the hardware: Triton (cuda) lowering of the GPU kernels, Mosaic AOT compile for TPU."""
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from jaxtx.kernels.flash_attention.gpu import flash_attention_gpu

B, T, S, H, K, Hd = 2, 256, 256, 8, 2, 64


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("case", ["causal_window_alibi_segments", "plain_f32"])
def test_gpu_flash_fwd_and_bwd_lower_to_triton(case):
    dtype = jnp.float32 if case == "plain_f32" else jnp.bfloat16
    masked = case != "plain_f32"

    def loss(q, k, v, seg):
        o = flash_attention_gpu(q, k, v, causal=masked, window=100 if masked else None,
                                segment_ids=seg if masked else None,
                                alibi_slopes=jnp.linspace(0.1, 1.0, H) if masked else None)
        return o.astype(jnp.float32).sum()

    args = (_sds((B, T, H, Hd), dtype), _sds((B, S, K, Hd), dtype), _sds((B, S, K, Hd), dtype),
            _sds((B, T), jnp.int32))
    fwd = jax.jit(loss).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "jaxtx_flash_fwd" in fwd and "__gpu$xla.gpu.triton" in fwd
    for name in ("jaxtx_flash_fwd", "jaxtx_flash_bwd_dkdv", "jaxtx_flash_bwd_dq"):
        assert name in bwd, name
    assert bwd.count("__gpu$xla.gpu.triton") == 3


@pytest.fixture
def no_persistent_cache():
    """TPU executables compiled on this CPU host cannot be loaded back from the persistent cache (jax warns on each
    read). jax decides once per process whether the cache is on, so also raise the write thresholds: no entry is
    written for these compiles."""
    keys = ("jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    prev = [getattr(jax.config, k) for k in keys]
    for k, val in zip(keys, (False, 1e9, 1 << 62)):
        jax.config.update(k, val)
    yield
    for k, val in zip(keys, prev):
        jax.config.update(k, val)


def _tpu_topology_mesh():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: the Mosaic AOT compile needs it (pip install libtpu==0.0.42.1)")
    import os

    import numpy as np
    from jax.experimental import topologies

    # Other processes on this machine may hold libtpu's lockfile; compile-only use needs no exclusive TPU access.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    return jax.sharding.Mesh(np.array(topo.devices).reshape(4), ("data",))


def test_tpu_flash_fwd_bwd_aot_compile_v5e(no_persistent_cache):
    """Mosaic kernels compile for a v5e:2x2 topology inside shard_map (batch-sharded), forward and backward."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtx.kernels.flash_attention.tpu import flash_attention_tpu

    mesh = _tpu_topology_mesh()
    Bt = 8

    def attn(q, k, v, seg):
        return flash_attention_tpu(q, k, v, causal=True, window=300, segment_ids=seg,
                                   alibi_slopes=jnp.linspace(0.1, 1.0, H))

    sm = jax.shard_map(attn, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P("data"), check_vma=False)
    sh = NamedSharding(mesh, P("data"))
    args = [jax.ShapeDtypeStruct((Bt, 512, H, 128), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((Bt, 512, K, 128), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((Bt, 512, K, 128), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((Bt, 512), jnp.int32, sharding=sh)]
    fwd = jax.jit(sm).lower(*args).compile()
    assert fwd.memory_analysis().temp_size_in_bytes < 64 << 20
    loss = lambda *a: sm(*a).astype(jnp.float32).sum()  # noqa: E731
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    hlo = bwd.as_text()
    for name in ("jaxtx_flash_fwd_tpu", "jaxtx_flash_bwd_dkdv_tpu", "jaxtx_flash_bwd_dq_tpu"):
        assert name in hlo, name


def test_tpu_flash_aot_compile_unaligned_lengths(no_persistent_cache):
    """T = 200 (padded to 2 x 128 blocks), S = 40 (one 48-row block), Hd = 64, bf16: Mosaic tiling still holds."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtx.kernels.flash_attention.tpu import flash_attention_tpu

    mesh = _tpu_topology_mesh()
    sm = jax.shard_map(lambda q, k, v: flash_attention_tpu(q, k, v, window=64), mesh=mesh,
                       in_specs=(P("data"),) * 3, out_specs=P("data"), check_vma=False)
    sh = NamedSharding(mesh, P("data"))
    args = [jax.ShapeDtypeStruct((4, 200, 4, 64), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((4, 40, 2, 64), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((4, 40, 2, 64), jnp.bfloat16, sharding=sh)]
    loss = lambda *a: sm(*a).astype(jnp.float32).sum()  # noqa: E731
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()


def _ragged_args(N, R, npp, Kh, Pg, ps, Hd, q_dtype, page_dtype):
    """q, k/v pages, kv_lens, page_table, cu_q_lens, num_seqs, k/v scales of ragged_paged_attention."""
    return (_sds((N, H, Hd), q_dtype), _sds((Kh, Pg, ps, Hd), page_dtype), _sds((Kh, Pg, ps, Hd), page_dtype),
            _sds((R,), jnp.int32), _sds((R, npp), jnp.int32), _sds((R + 1,), jnp.int32), _sds((), jnp.int32),
            _sds((Kh, Pg, ps), jnp.float32), _sds((Kh, Pg, ps), jnp.float32))


@pytest.mark.parametrize("int8", [False, True])
def test_ragged_paged_attention_gpu_lowers_to_triton(int8):
    from jaxtx.kernels import ragged_paged_attention

    args = _ragged_args(256, 16, 64, 2, 512, 16, 128, jnp.bfloat16, jnp.int8 if int8 else jnp.bfloat16)

    def f(q, kp, vp, kl, pt, cu, ns, ks, vs):
        return ragged_paged_attention(q, kp, vp, kv_lens=kl, page_table=pt, cu_q_lens=cu, num_seqs=ns,
                                      k_scales=ks if int8 else None, v_scales=vs if int8 else None,
                                      window=None if int8 else 200, backend="pallas_gpu")

    txt = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "jaxtx_ragged_paged_attention" in txt and "__gpu$xla.gpu.triton" in txt


@pytest.mark.parametrize("int8", [False, True])
def test_ragged_paged_attention_tpu_aot_compile_v5e(no_persistent_cache, int8):
    """The Mosaic kernel compiles for v5e inside shard_map (kv heads sharded, the engine's layout: pages shard over
    kv heads, metadata replicated)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxtx.kernels import ragged_paged_attention

    mesh = _tpu_topology_mesh()
    Kh, Pg, ps, Hd, N, R, npp = 4, 256, 16, 128, 128, 8, 32

    def f(q, kp, vp, kl, pt, cu, ns, ks, vs):
        return ragged_paged_attention(q, kp, vp, kv_lens=kl, page_table=pt, cu_q_lens=cu, num_seqs=ns,
                                      k_scales=ks if int8 else None, v_scales=vs if int8 else None,
                                      window=None if int8 else 100, backend="pallas_tpu")

    heads, rep = P(None, "data"), P()
    specs = (heads, P("data"), P("data"), rep, rep, rep, rep, P("data"), P("data"))
    sm = jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)
    args = _ragged_args(N, R, npp, Kh, Pg, ps, Hd, jnp.bfloat16, jnp.int8 if int8 else jnp.bfloat16)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, sp)) for a, sp in zip(args, specs)]
    compiled = jax.jit(sm).lower(*args).compile()
    assert "jaxtx_ragged_paged_attention_tpu" in compiled.as_text()
