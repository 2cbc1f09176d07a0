"""Sharding on 8 fake CPU devices: DP/FSDP/TP/EP and mixes train exactly like one device; golden PartitionSpecs;
clear errors; the replication check; kernels and MoE wrapped in shard_map match their single-device results.

Regenerate the golden file after an intended change: JAXTX_UPDATE_GOLDEN=1 pytest tests/jaxtx/test_sharding.py -k golden
"""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxtx import moe_parallel, sharding
from jaxtx.config import ConfigError, load_model_config

GOLDEN = Path(__file__).with_name("golden_partition_specs.json")
SMALL = ["n_layers=2", "d_model=64", "n_heads=4", "n_kv_heads=2", "d_ff=128", "vocab_size=512"]


# ------------------------------------------------------------------------------------------------ training parity
def _train(cfg, mesh_cfg, steps=3, B=8, T=16):
    """`steps` AdamW steps; mesh_cfg None = one device, no mesh. Returns (losses, params as numpy, final params)."""
    from jaxtx import model as model_lib
    model = model_lib.build(cfg)
    opt = optax.adamw(3e-3, weight_decay=0.1)
    ids = jax.random.randint(jax.random.key(1), (steps, B, T + 1), 0, cfg.vocab_size)

    def loss_fn(p, x):
        logits, st = model.apply({"params": p}, x[:, :-1], mutable=["intermediates"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
        return ce + model_lib.moe_aux_loss(st.get("intermediates", {}), cfg)

    def step(p, s, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    dummy = jnp.zeros((B, T), jnp.int32)
    if mesh_cfg is None:
        # jitted: eager init of MoE takes ~30 s
        p = jax.jit(lambda r: model_lib.init_params(model, r, dummy))(jax.random.key(0))
        s = opt.init(p)
        run = jax.jit(step)
        losses = []
        for i in range(steps):
            p, s, loss = run(p, s, ids[i])
            losses.append(float(loss))
        return losses, p, None
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_for(mesh_cfg)
    _, psh = sharding.param_shardings(model, mesh, rules, dummy)
    p = sharding.init_sharded(model, jax.random.key(0), mesh, rules, dummy)
    s = sharding.init_opt_state(opt, p, psh)
    osh = sharding.opt_state_shardings(opt, p, psh)
    bsh = sharding.batch_sharding(mesh, rules)
    with sharding.use_mesh(mesh, rules):
        run = jax.jit(step, in_shardings=(psh, osh, bsh), out_shardings=(psh, osh, None), donate_argnums=(0, 1))
        losses = []
        for i in range(steps):
            p, s, loss = run(p, s, jax.device_put(ids[i], bsh))
            losses.append(float(loss))
        hlo = run.lower(p, s, jax.device_put(ids[0], bsh)).as_text()
    return losses, p, (psh, s, osh, hlo)


_REF = {}


def _reference(name, cfg):
    if name not in _REF:
        _REF[name] = _train(cfg, None)
    return _REF[name]


# Each case compiles a sharded train step (~10-20 s on 2 shared cores): the mixes run by default, pure presets are slow.
@pytest.mark.parametrize("mesh_kw", [
    pytest.param(dict(data=8), marks=pytest.mark.slow, id="dp"),
    pytest.param(dict(data=1, fsdp=8), marks=pytest.mark.slow, id="fsdp"),
    pytest.param(dict(data=4, tensor=2), marks=pytest.mark.slow, id="tp"),
    pytest.param(dict(data=2, fsdp=2, tensor=2), id="dp2-fsdp2-tp2"),
])
def test_dense_parity(mesh_kw):
    cfg = load_model_config("tiny", SMALL)
    ref_losses, ref_p, _ = _reference("dense", cfg)
    losses, p, (psh, s, osh, _) = _train(cfg, sharding.MeshConfig(**mesh_kw))
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # The layout survived the steps: params and Adam moments are still split as the rules say.
    assert jax.tree.map(lambda a: a.sharding.spec, p) == jax.tree.map(lambda sh: sh.spec, psh)
    mu = s[0].mu
    assert jax.tree.map(lambda a: a.sharding.spec, mu) == jax.tree.map(lambda sh: sh.spec, psh)
    want = P("tensor" if "tensor" in mesh_kw else None, "fsdp" if mesh_kw.get("fsdp", 1) > 1 else None)  # [V, D]
    assert p["embed"]["embedding"].sharding.spec == mu["embed"]["embedding"].sharding.spec == want


@pytest.mark.parametrize("mesh_kw,cf", [
    pytest.param(dict(data=2, expert=4), None, marks=pytest.mark.slow, id="dp2-ep4-dropless"),
    pytest.param(dict(fsdp=2, tensor=2, expert=2), 2.0, id="fsdp2-tp2-ep2-capacity"),
])
def test_moe_parity(mesh_kw, cf):
    cfg = load_model_config("tiny", SMALL + ["num_experts=4", "experts_per_token=2",
                                             f"capacity_factor={cf if cf else 'null'}"])
    ref_losses, ref_p, _ = _reference(f"moe{cf}", cfg)
    losses, p, (_, _, _, hlo) = _train(cfg, sharding.MeshConfig(**{"data": 1, **mesh_kw}))
    assert "all_to_all" in hlo  # tokens really travelled to their experts
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ golden specs
def _golden_specs():
    """Specs of the tiny preset's params under each preset, on a mesh where every split axis has size 2."""
    from jaxtx import model as model_lib
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    out = {}
    for preset, extra in [("dp", []), ("fsdp", []), ("tp", []), ("fsdp+tp", []),
                          ("ep", ["num_experts=4"]), ("fsdp+tp+ep", ["num_experts=4"])]:
        cfg = load_model_config("tiny", extra)
        _, sh = sharding.param_shardings(model_lib.build(cfg), mesh, sharding.rules_for(preset),
                                         *model_lib.dummy_inputs(cfg))
        flat = jax.tree_util.tree_flatten_with_path(sh)[0]
        out[preset] = {sharding._path_str(path): [list(d) if isinstance(d, tuple) else d for d in s.spec]
                       for path, s in flat}
    return out


def test_golden_partition_specs():
    got = _golden_specs()
    if os.environ.get("JAXTX_UPDATE_GOLDEN"):
        GOLDEN.write_text("{\n" + ",\n".join(  # one param per line, so a diff shows which spec changed
            f' "{k}": {{\n' + ",\n".join(f'  "{n}": {json.dumps(v)}' for n, v in sorted(got[k].items())) + "\n }"
            for k in sorted(got)) + "\n}\n")
    want = json.loads(GOLDEN.read_text())
    assert got == want
    # Spot checks that keep the golden file honest (Megatron column/row split, ZeRO-3 on embed, experts on expert).
    tp = want["fsdp+tp+ep"]
    assert any(v[-2:] == ["fsdp", "tensor"] for v in tp.values())  # an [embed, mlp] matrix
    assert any(v[:1] == [None] and "expert" in v for v in tp.values())  # stacked experts [layers, expert, ...]
    assert all(all(d is None for d in v) for v in want["dp"].values())


# ------------------------------------------------------------------------------------------------ rules and errors
def test_presets_and_rules():
    assert sharding.rules_for("tp+fsdp") == sharding.rules_for("fsdp+tp")
    assert dict(sharding.rules_for(sharding.MeshConfig(data=2, tensor=4)))["heads"] == "tensor"
    assert "embed" not in dict(sharding.rules_for(sharding.MeshConfig(data=2, tensor=4)))
    with pytest.raises(ConfigError, match="unknown part"):
        sharding.rules_for("zero3")
    with pytest.raises(ConfigError, match="unknown mesh axis"):
        sharding.rules_for((("embed", "model"),))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    rules = (("embed", "tensor"), ("mlp", "tensor"))
    with pytest.raises(ConfigError, match=r"param w.*'embed' and 'mlp'.*'tensor'"):
        sharding.logical_to_spec(("embed", "mlp"), rules, mesh, shape=(8, 8), what="param w")
    # Activations resolve by priority: batch takes data+fsdp first, so embed falls back to replicated.
    import flax.linen as nn
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), sharding.rules_for("fsdp")) == \
        P(("data", "fsdp", "expert"), None, None)


def test_mesh_config_errors_and_fill():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, tensor=2))
    assert dict(mesh.shape) == dict(data=4, fsdp=1, tensor=2, expert=1)
    with pytest.raises(ConfigError, match=r"data=3 .* = 3 devices, but there are 8"):
        sharding.make_mesh(sharding.MeshConfig(data=3))
    with pytest.raises(ConfigError, match="cannot fill 8 devices per slice"):
        sharding.make_mesh(sharding.MeshConfig(data=-1, tensor=3))
    with pytest.raises(ConfigError, match="at most one"):
        sharding.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="did you mean 'tensor'"):
        sharding.MeshConfig.from_dict({"tensr": 2})
    # DCN on one process: 2 groups of 4 devices (granules are processes, so ask for the total explicitly).
    assert sharding.mesh_shape(sharding.MeshConfig(data=1, fsdp=-1, dcn_data=2), 8, 2) == ((1, 4, 1, 1), (2, 1, 1, 1))
    for name in ("dp", "fsdp", "fsdp-tp", "fsdp-ep", "multislice-fsdp"):
        sharding.load_mesh_config(name)


def test_indivisible_param_names_tensor_shape_and_axis():
    from jaxtx import model as model_lib
    cfg = load_model_config("tiny", SMALL)  # kv_heads = 2
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=4))
    with pytest.raises(ConfigError, match=r"param .*k.*shape \(.*\): dim \d \('kv_heads', size 2\) is not divisible "
                                          r"by mesh axis tensor of size 4"):
        sharding.param_shardings(model_lib.build(cfg), mesh, sharding.rules_for("tp"), jnp.zeros((8, 8), jnp.int32))


def test_check_replicated():
    from jaxtx import model as model_lib
    cfg = load_model_config("tiny", SMALL)
    model, ids = model_lib.build(cfg), jnp.zeros((8, 8), jnp.int32)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8))
    abstract, _ = sharding.param_shardings(model, mesh, sharding.rules_for("dp"), ids)
    big = sharding.check_replicated(abstract, threshold_bytes=64 * 1024)
    # Exactly the params of >= 64 KiB: embedding 512x64 f32 = 128 KiB and the stacked [2, 64, 128] FFN matrices
    # (64 KiB).
    sizes = {tuple(x.shape): x for x in jax.tree.leaves(abstract)}
    expect = sum(1 for x in jax.tree.leaves(abstract) if np.prod(x.shape) * 4 >= 64 * 1024)
    assert len(big) == expect >= 2 and any("(512, 64)" in line for line in big), (big, sizes.keys())
    abstract, _ = sharding.param_shardings(model, mesh, sharding.rules_for("fsdp"), ids)
    assert sharding.check_replicated(abstract, threshold_bytes=64 * 1024) == []
    # Real arrays work too (sharded init), and nothing is reported on a single device.
    p = sharding.init_sharded(model, jax.random.key(0), mesh, sharding.rules_for("fsdp"), ids)
    assert sharding.check_replicated(p, 0) == []
    assert sharding.check_replicated(model_lib.init_params(model, jax.random.key(0), ids), 0) == []


def test_constraints_take_effect_only_inside_use_mesh():
    from jaxtx import model as model_lib
    cfg = load_model_config("tiny", SMALL)
    model = model_lib.build(cfg)
    mesh, rules = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2)), sharding.rules_for("fsdp+tp")
    p = sharding.init_sharded(model, jax.random.key(0), mesh, rules, jnp.zeros((8, 8), jnp.int32))
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    x = jnp.zeros((8, 8), jnp.int32)
    outside = jax.jit(f).lower(p, x).as_text()
    with sharding.use_mesh(mesh, rules):
        inside = jax.jit(f).lower(p, x).as_text()
    assert outside.count("sharding_constraint") == 0 < inside.count("sharding_constraint")


# ------------------------------------------------------------------------------------------------ shard_map wrappers
def test_shard_map_attention_matches_unsharded():
    from jaxtx.kernels import attention_reference
    B, T, H, K, Hd = 4, 16, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, Hd))
    k, v = (jax.random.normal(kk, (B, T, K, Hd)) for kk in ks[1:])
    seg = jnp.repeat(jnp.array([[1] * 10 + [2] * 6]), B, 0)
    slopes = jnp.linspace(0.1, 0.8, H)
    want = attention_reference(q, k, v, causal=True, segment_ids=seg, alibi_slopes=slopes)
    mesh, rules = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2)), sharding.rules_for("fsdp+tp")
    calls = []

    def kernel(q, k, v, **kw):  # a single-device kernel: it must see local shapes
        calls.append((q.shape, k.shape))
        return attention_reference(q, k, v, **kw)

    with sharding.use_mesh(mesh, rules):
        got = jax.jit(lambda q, k, v, s, a: sharding.shard_map_attention(kernel)(
            q, k, v, causal=True, segment_ids=s, alibi_slopes=a))(q, k, v, seg, slopes)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert calls[-1] == ((1, T, 2, Hd), (1, T, 1, Hd))  # batch / 4, heads / 2
    # No mesh: the kernel is called unwrapped with full shapes.
    sharding.shard_map_attention(kernel)(q, k, v, causal=True)
    assert calls[-1] == ((B, T, H, Hd), (B, T, K, Hd))
    # The decode kernel on the KV-cache layout [B, K, S, Hd] with per-row positions (-1 = empty slot).
    from jaxtx.kernels import decode_attention
    kc, vc = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    q1, qpos = q[:, -1:], jnp.full((B, 1), T - 1)
    kvpos = jnp.where(jnp.arange(T)[None] < jnp.arange(B)[:, None] + 12, jnp.arange(T)[None], -1)
    want = decode_attention(q1, kc, vc, q_positions=qpos, kv_positions=kvpos)

    def dec_kernel(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw["kv_positions"].shape))
        return decode_attention(q, k, v, **kw)

    with sharding.use_mesh(mesh, rules):
        got = jax.jit(lambda *a: sharding.shard_map_decode_attention(dec_kernel)(
            a[0], a[1], a[2], q_positions=a[3], kv_positions=a[4]))(q1, kc, vc, qpos, kvpos)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert calls[-1] == ((1, 1, 2, Hd), (1, 1, T, Hd), (1, T))


@pytest.mark.parametrize("cf", [None, 1.0], ids=["dropless", "capacity"])
def test_dispatch_combine_matches_single_device(cf):
    from jaxtx.layers import moe
    cfg = load_model_config("tiny", ["num_experts=8", "d_model=32", "d_ff=48",
                                     f"capacity_factor={cf if cf else 'null'}"])
    B, T, D, E, F, k = 8, 16, 32, 8, 48, 2
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (B, T, D))
    _, w, e = moe.route(jax.random.normal(ks[1], (B * T, E)), k)
    w, e = w.reshape(B, T, k), e.reshape(B, T, k)
    wts = {"wi_gate": 0.2 * jax.random.normal(ks[2], (E, D, F)), "wi_up": 0.2 * jax.random.normal(ks[3], (E, D, F)),
           "wo": 0.2 * jax.random.normal(ks[4], (E, F, D))}

    def ref(x, wts):
        if cf is None:
            y, d = moe.experts_dropless(x.reshape(B * T, D), w.reshape(-1, k), e.reshape(-1, k), wts, cfg)
            return y.reshape(B, T, D), d
        return moe.experts_capacity(x, w, e, wts, cfg)

    loss = lambda fn: lambda x, wts: jnp.sum(jnp.sin(fn(x, wts)[0]))  # noqa: E731
    y_ref, d_ref = ref(x, wts)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(x, wts)
    mc = sharding.MeshConfig(data=1, fsdp=2, tensor=2, expert=2)
    with sharding.use_mesh(sharding.make_mesh(mc), sharding.rules_for(mc)):
        assert moe_parallel.ep_active()
        ep = lambda x, wts: moe_parallel.dispatch_combine(x, w, e, wts, cfg)  # noqa: E731
        y, d = jax.jit(ep)(x, wts)
        g = jax.jit(jax.grad(loss(ep), argnums=(0, 1)))(x, wts)
        assert "all-to-all" in jax.jit(ep).lower(x, wts).compile().as_text()
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(d, d_ref)
    if cf is not None:
        assert float(d) > 0  # capacity 1.0 with random routing must drop something, or the test proves nothing
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert not moe_parallel.ep_active()  # outside the mesh context


def test_param_shardings_inside_and_outside_the_mesh_context_agree():
    """Abstract params are read off the boxes, never unboxed with constraints (which fails inside use_mesh)."""
    from jaxtx import model as model_lib
    cfg = load_model_config("tiny", SMALL)
    m = model_lib.build(cfg)
    mc = sharding.MeshConfig(data=2, fsdp=2, tensor=2)
    mesh, rules = sharding.make_mesh(mc), sharding.rules_for(mc)
    _, outside = sharding.param_shardings(m, mesh, rules, *model_lib.dummy_inputs(cfg))
    with sharding.use_mesh(mesh, rules):
        _, inside = sharding.param_shardings(m, mesh, rules, *model_lib.dummy_inputs(cfg))
    assert jax.tree.all(jax.tree.map(lambda a, b: a == b, outside, inside))
