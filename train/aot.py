"""`jaxtx aot CONFIG --topology v5p:2x2x1 [key=value ...]`: compile the training step for a TPU pod slice on a machine
without TPUs, and say whether it fits.

libtpu provides compile-only devices for a named topology; the real train step (jaxtx.train.step) is lowered with
abstract, sharded state and batch (nothing is allocated), compiled by the TPU compiler, and XLA's memory and cost
analyses give per-device HBM use and FLOPs. Exit codes: 0 fits, 1 does not fit (the message gives the numbers),
2 bad config / topology / no libtpu.

CONFIG is a run config (YAML path or a name under configs/ or configs/runs/) or, for convenience, a model preset name;
`--mesh NAME` takes the mesh section from configs/meshes/NAME.yaml; dotted overrides (mesh.fsdp=4, train.batch_size=64,
model.n_layers=4) apply last.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

# HBM per chip (GiB), by the topology name's generation prefix. The compile-only devices report no memory stats.
HBM_GIB = {"v2": 8, "v3": 16, "v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32, "v7": 192, "v7x": 192}


def _options(p, required: bool) -> None:
    p.add_argument("--topology", required=required, help="TPU topology, e.g. v5p:2x2x1, v5e:4x4, v4:2x2x2")
    p.add_argument("--num-slices", type=int, default=None, help="slices joined over DCN (use mesh.dcn_* to split)")
    p.add_argument("--mesh", default=None, help="mesh preset under configs/meshes/ (e.g. fsdp-tp)")
    p.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip; default from the topology generation")
    p.add_argument("--decode", default=None, metavar="BATCHxMAXLEN",
                   help="also compile one decode step for BATCH rows and a KV cache of MAXLEN slots, e.g. 64x8192")
    p.add_argument("--no-train", action="store_true", default=None, help="with --decode: skip the train step")
    p.add_argument("--weights", default=None, metavar="SCHEME",
                   help="with --decode: quantized weights (int8, fp8, int4-g128, nf4, nf4-dq; jaxtx.quant defaults)")


def register(subparsers) -> None:
    p = subparsers.add_parser("aot",
                              help="compile the train step for a TPU topology (no TPU needed); report HBM, FLOPs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(p, required=False)
    p.add_argument("config", help="run config (YAML path or name) or a model preset name (e.g. llama3-8b)")
    # REMAINDER: the core CLI uses parse_args, which cannot take options after the overrides have started; options
    # given after CONFIG land here and are parsed again in run().
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="dotted overrides: mesh.fsdp=4 train.batch_size=32 model.n_layers=4")
    p.set_defaults(func=run)


def _merge_late_options(args) -> None:
    late = argparse.ArgumentParser(prog="jaxtx aot", add_help=False)
    _options(late, required=False)
    late.add_argument("rest", nargs="*")
    ns = late.parse_intermixed_args(args.overrides)
    for k in ("topology", "num_slices", "mesh", "hbm_gib", "decode", "no_train", "weights"):
        if getattr(ns, k) is not None:
            setattr(args, k, getattr(ns, k))
    args.overrides = ns.rest
    args.num_slices = args.num_slices or 1


def load_config(config: str, mesh: str | None, overrides: list[str]):
    """Run config from a run YAML or a model preset, with the mesh preset and overrides applied."""
    from jaxtx.config import ConfigError, preset_names
    from jaxtx.train.config import load_run_config, resolve_run_path
    pre = []
    if mesh:
        from jaxtx.sharding import load_mesh_config
        import dataclasses
        pre = [f"mesh.{k}={v}" for k, v in dataclasses.asdict(load_mesh_config(mesh)).items()]
    try:
        resolve_run_path(config)
        return load_run_config(config, pre + list(overrides))
    except ConfigError:
        if config not in preset_names():
            raise
    return load_run_config(None, [f"model.preset={config}"] + pre + list(overrides))


def hbm_bytes(topology: str, override_gib: float | None) -> int:
    from jaxtx.config import ConfigError
    if override_gib:
        return int(override_gib * 2**30)
    gen = topology.split(":")[0].lower()
    if gen not in HBM_GIB:
        raise ConfigError(f"--topology {topology!r}: unknown HBM size for generation {gen!r} "
                          f"(known: {sorted(HBM_GIB)}); pass --hbm-gib")
    return int(HBM_GIB[gen] * 2**30)


def topology_devices(topology: str, num_slices: int = 1):
    from jax.experimental import topologies
    from jaxtx.config import ConfigError
    # libtpu takes /tmp/libtpu_lockfile per process; compile-only use touches no chip, so several processes (tests,
    # other engineers' kernel AOT checks) may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        try:
            topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw)
        except Exception as e:  # noqa: BLE001
            # libtpu assumes 2x2x1 chips per host, so a slice smaller than a host ("v5e:1x1", one 16 GiB chip, sold
            # as v5litepod-1) is refused unless the host bounds are the slice itself
            dims = topology.split(":")[-1].split("_")[0].split("x")
            if "chips_per_host_bounds" not in str(e) or not all(d.isdigit() for d in dims) or len(dims) > 3:
                raise
            bounds = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
            if math.prod(bounds) >= 4:  # not smaller than a host: the name itself is wrong (e.g. v5p:9x9x9)
                raise
            topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                chips_per_host_bounds=bounds, **kw)
    except Exception as e:  # noqa: BLE001 — libtpu missing or a bad name; both are user-fixable
        raise ConfigError(f"--topology {topology!r}: cannot get compile-only TPU devices ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); is libtpu installed and the name valid "
                          "(e.g. v5p:2x2x1, v5e:2x2)?") from e
    return list(topo.devices)


class DoesNotFit(Exception):
    """The TPU compiler itself refused: the program needs more HBM than a chip has."""


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _compile(lowered, what: str, args_tree, hbm: int):
    """Compile without writing to the persistent compilation cache (a TPU executable cannot be loaded back on this
    host, so an entry only costs disk and a warning on every later read). jax decides once per process whether the
    cache is used, so toggling jax_enable_compilation_cache does not stop writes; the write thresholds do.
    A compiler out-of-memory becomes DoesNotFit with the numbers."""
    import jax
    keys = ("jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    prev = [getattr(jax.config, k) for k in keys]
    jax.config.update(keys[0], 1e9)
    jax.config.update(keys[1], 1 << 62)
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        xla = str(e).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        raise DoesNotFit(f"{what}: the TPU compiler ran out of HBM ({xla}); the arguments alone (train state + batch) "
                         f"take {gib(_shard_bytes(args_tree))} per device of {gib(hbm)}") from None
    finally:
        for k, v in zip(keys, prev):
            jax.config.update(k, v)


def compile_train_step(run_cfg, devices, hbm: int = 0):
    """Lower and compile the train step for `devices`. Returns (compiled, info dict)."""
    import jax
    from jaxtx import model as jmodel
    from jaxtx import sharding as shd
    from jaxtx import sizing
    from jaxtx.train.optim import make_optimizer
    from jaxtx.train.step import abstract_batch, make_train_step, state_shardings

    cfg = run_cfg.model_config()
    mesh, rules = shd.make_mesh(run_cfg.mesh, devices=devices), shd.rules_for(run_cfg.mesh)
    from jaxtx.train.loop import check_batch
    check_batch(run_cfg, mesh, rules)
    model = jmodel.build(cfg)
    optimizer = make_optimizer(run_cfg.optim, run_cfg.train.steps)
    # Abstract state outside the mesh context: making the dummy init inputs (concrete arrays) under a mesh of
    # compile-only devices would try to place them there.
    state, shardings = state_shardings(model, cfg, run_cfg, optimizer, mesh, rules)
    batch = abstract_batch(cfg, run_cfg, mesh, rules)
    with shd.use_mesh(mesh, rules):
        step = make_train_step(model, cfg, run_cfg, optimizer, mesh=mesh, rules=rules, shardings=shardings)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = _compile(lowered, "train step", (state, batch), hbm)
        t2 = time.perf_counter()
    counts = sizing.param_counts(cfg)  # a token runs k of E experts: the FLOPs estimate counts only those
    n_trained = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_params = counts.total if "frozen" in state else n_trained  # LoRA: the model is the frozen base
    info = {"lower_s": t1 - t0, "compile_s": t2 - t1, "mesh": dict(mesh.shape), "n_params": n_params,
            "n_active": n_params - (counts.ffn - counts.ffn_active),
            "tokens": run_cfg.train.batch_size * run_cfg.train.seq_len,
            "replicated": shd.check_replicated(state["params"], threshold_bytes=64 * 2**20)}
    if "frozen" in state:  # LoRA / QLoRA: what trains, and what the frozen base weighs per device
        from jaxtx import lora
        info["lora"] = {"trained": n_trained, "base_bytes": _shard_bytes(lora.strip(state["frozen"])),
                        "quantize": run_cfg.lora.quantize}
    return compiled, info


def compile_decode_step(run_cfg, devices, batch: int, max_len: int, hbm: int = 0, weights: str | None = None):
    """Lower and compile one decode step (a token per row against a KV cache of max_len slots, cache donated), params
    in the compute dtype as served, or quantized (`weights`: a jaxtx.quant scheme name such as "int8" or "int4-g128";
    scales shard with their kernels, jaxtx.quant.shardings). The cache is split like the activations: rows over the
    batch axes, kv heads over tensor. Returns (compiled, info dict)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jaxtx import model as jmodel
    from jaxtx import sharding as shd
    from jaxtx.cache import KVCache
    from jaxtx.config import ConfigError
    from jaxtx.layers.common import dtype_of

    cfg = run_cfg.model_config()
    if cfg.kind != "decoder":
        raise ConfigError(f"--decode: model.kind={cfg.kind!r}; the decode step is compiled for decoder models only")
    mesh, rules = shd.make_mesh(run_cfg.mesh, devices=devices), shd.rules_for(run_cfg.mesh)
    model, dt = jmodel.build(cfg), dtype_of(cfg.dtype)
    params, _ = shd.param_shardings(model, mesh, rules, *jmodel.dummy_inputs(cfg))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, dt if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=a.sharding), params)
    if weights:
        from jaxtx import quant
        scheme, opts = quant.parse_scheme(weights)
        plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        q = jax.eval_shape(lambda p: quant.quantize_params(p, scheme, **opts), plain)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), q,
                              quant.shardings(model, q, mesh, rules))
    cache = jax.eval_shape(lambda: KVCache.init(cfg, batch, max_len, dt))

    def spec(names, a, what):
        return NamedSharding(mesh, shd.logical_to_spec(names, rules, mesh, shape=a.shape, what=what))
    kv = ("batch", "kv_heads", None, "head_dim")
    kv_spec = lambda a, what: spec(kv if a.ndim == 4 else ("layers",) + kv, a, what)  # per layer or stacked
    cache_sh = cache.replace(k=jax.tree.map(lambda a: kv_spec(a, "KV cache k"), cache.k),
                             v=jax.tree.map(lambda a: kv_spec(a, "KV cache v"), cache.v),
                             pos=spec(("batch", None), cache.pos, "KV cache pos"),
                             lengths=spec(("batch",), cache.lengths, "KV cache lengths"))
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, cache_sh)
    tok_sh = spec(("batch", None), cache.pos, "decode tokens")
    ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tok_sh)
    logits_sh = NamedSharding(mesh, shd.logical_to_spec(("batch", None, "vocab"), rules, mesh))

    def step(p, c, ids, pos):
        return model.apply({"params": p}, ids, positions=pos, cache=c)

    with shd.use_mesh(mesh, rules):
        fn = jax.jit(step, out_shardings=(logits_sh, cache_sh), donate_argnums=(1,))
        t0 = time.perf_counter()
        lowered = fn.lower(params, cache, ids, ids)
        t1 = time.perf_counter()
        compiled = _compile(lowered, "decode step", (params, cache), hbm)
        t2 = time.perf_counter()
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(jmodel.abstract_params(model)))
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "mesh": dict(mesh.shape), "n_params": n_params,
                      "weight_bytes": sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params)),
                      "tokens": batch, "replicated": [], "flop_factor": 2, "cache_bytes": sum(
                          a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))}


def analyze(compiled, hbm: int) -> dict:
    """Per-device bytes from XLA's memory analysis and FLOPs from its cost analysis."""
    m = compiled.memory_analysis()
    args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    alias, code = m.alias_size_in_bytes, m.generated_code_size_in_bytes
    total = args + out - alias + temp + code  # donated state: outputs reuse the argument buffers
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"arguments": args, "outputs": out, "aliased": alias, "temps": temp, "code": code, "total": total,
            "hbm": hbm, "fits": total <= hbm, "flops": float((cost or {}).get("flops", float("nan")))}


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def report(topology: str, n_devices: int, info: dict, mem: dict, out=None) -> None:
    p = lambda s: print(s, file=out or sys.stdout)  # noqa: E731
    p(f"topology {topology}: {n_devices} chips, mesh {info['mesh']}")
    n_active = info.get("n_active", info["n_params"])
    p(f"params {info['n_params'] / 1e9:.3f} B ({n_active / 1e9:.3f} B active per token), "
      f"{info['tokens']} tokens per step"
      + (f", KV cache {gib(info['cache_bytes'])} in all" if "cache_bytes" in info else "")
      + (f", weights {gib(info['weight_bytes'])} in all" if "weight_bytes" in info else ""))
    if "lora" in info:
        lo = info["lora"]
        p(f"LoRA: {lo['trained'] / 1e6:.1f} M trained params ({100 * lo['trained'] / info['n_params']:.2f}%), frozen "
          f"base {lo['quantize'] or 'float'} {gib(lo['base_bytes'])} per device")
    p(f"lower {info['lower_s']:.1f} s, compile {info['compile_s']:.1f} s")
    p(f"HBM per device: arguments {gib(mem['arguments'])} + outputs {gib(mem['outputs'])} - aliased "
      f"{gib(mem['aliased'])} + temps {gib(mem['temps'])} + code {gib(mem['code'])} = {gib(mem['total'])} "
      f"of {gib(mem['hbm'])} ({100 * mem['total'] / mem['hbm']:.0f}%)")
    # 6 * params * tokens counts matmul FLOPs of a dense forward+backward; XLA's count adds attention, remat, etc.
    # XLA's cost analysis counts a while-loop body once, so with scan_layers it sees one layer of the stack.
    f = info.get("flop_factor", 6)  # forward + backward = 6 N per token; decode (forward) = 2 N
    p(f"FLOPs per device per step (XLA cost analysis, a scanned layer stack counted once): {mem['flops']:.4g}; "
      f"{f}*N_active*tokens/devices = {f * n_active * info['tokens'] / n_devices:.4g}")
    for line in info["replicated"]:
        p(f"warning: replicated param >= 64 MiB: {line}")


def run(args) -> int:
    if "JAX_PLATFORMS" not in os.environ:  # never probe for a local accelerator: the TPU is compile-only here
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax
        try:
            jax.config.update("jax_platforms", "cpu")
        except Exception:  # noqa: BLE001 — a backend already started; harmless
            pass
    from jaxtx.config import ConfigError
    _merge_late_options(args)
    if not args.topology:
        print("error: --topology is required (e.g. --topology v5p:2x2x1)", file=sys.stderr)
        return 2
    try:
        if args.weights and not args.decode:
            raise ConfigError(f"--weights {args.weights}: quantized weights are for serving; add --decode BATCHxMAXLEN")
        if args.weights:
            from jaxtx import quant
            try:
                quant.parse_scheme(args.weights)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        run_cfg = load_config(args.config, args.mesh, args.overrides)
        hbm = hbm_bytes(args.topology, args.hbm_gib)
        devices = topology_devices(args.topology, args.num_slices)
        results = [] if args.no_train and args.decode else [("train step", *compile_train_step(run_cfg, devices, hbm))]
        if args.decode:
            try:
                b, n = (int(v) for v in args.decode.lower().split("x"))
            except ValueError:
                raise ConfigError(f"--decode {args.decode!r}: expected BATCHxMAXLEN, e.g. 64x8192") from None
            w = f", {args.weights} weights" if args.weights else ""
            results.append((f"decode step ({b} rows, {n} cache slots{w})",
                            *compile_decode_step(run_cfg, devices, b, n, hbm, weights=args.weights)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DoesNotFit as e:
        print(f"error: does not fit on {args.topology}: {e}; shard more (mesh.fsdp, mesh.tensor), lower "
              "train.batch_size or use model.remat=full", file=sys.stderr)
        return 1
    code = 0
    for name, compiled, info in results:
        print(f"== {name}")
        mem = analyze(compiled, hbm)
        report(args.topology, len(devices), info, mem)
        c, message = verdict(mem, args.topology)
        print(message, file=sys.stderr if c else sys.stdout)
        code = max(code, c)
    return code


def verdict(mem: dict, topology: str) -> tuple[int, str]:
    """(exit code, message): 0 and "fits", or 1 and the numbers that do not fit with what to change."""
    if mem["fits"]:
        return 0, "fits"
    return 1, (f"error: does not fit: {gib(mem['total'])} per device needed (arguments {gib(mem['arguments'])}, "
               f"outputs {gib(mem['outputs'])}, aliased {gib(mem['aliased'])}, temps {gib(mem['temps'])}) > "
               f"{gib(mem['hbm'])} HBM per {topology.split(':')[0]} chip; shard more (mesh.fsdp, mesh.tensor), "
               "lower train.batch_size or use model.remat=full")
