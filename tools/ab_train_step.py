"""A/B timing of two train-step variants in one process, alternating, on the same state and batch (issue 15).

    JAX_PLATFORMS=cpu python tools/ab_train_step.py configs/runs/bench125m.yaml --ab chunked_ce [--reps 4]

Variants (--ab): chunked_ce (the loss through jaxtx.train.chunked_ce vs the [B, T, V] logits), or
`module:ATTR=A,B` (a module constant patched while the step is traced, e.g.
`jaxtx.kernels.dispatch:XLA_MAX_TS=16384,1048576`; a value `@FILE:NAME` is NAME from that Python file, e.g. the
previous version of a function: `jaxtx.train.objectives:linear_ce_sum=@/tmp/old.py:linear_ce_sum,@train/chunked_ce.py:
linear_ce_sum`). Prints each variant's best and median step time and B/A.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time


def _value(old, v: str):
    if v.startswith("@"):
        import importlib.util
        path, name = v[1:].rsplit(":", 1)
        spec = importlib.util.spec_from_file_location(f"ab_{abs(hash(path))}", path)
        obj = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = obj  # dataclasses (flax modules) look their module up there
        spec.loader.exec_module(obj)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    return v == "True" if isinstance(old, bool) else type(old)(v)


def build_steps(run_cfg, ab: str):
    import jax
    import numpy as np

    from jaxtx import model as jmodel
    from jaxtx import sharding as shd
    from jaxtx.train.loop import make_run_mesh, resolve_model_config
    from jaxtx.train.objectives import make_objective
    from jaxtx.train.optim import make_optimizer
    from jaxtx.train.step import batch_shapes, init_train_state, make_train_step
    cfg = resolve_model_config(run_cfg)
    model = jmodel.build(cfg)
    opt = make_optimizer(run_cfg.optim, 1000)
    mesh, rules = make_run_mesh(run_cfg)
    rng = np.random.default_rng(0)
    sh = shd.batch_sharding(mesh, rules)
    batch = {k: jax.device_put(rng.integers(4, cfg.vocab_size, s).astype(np.int32) if "segment" not in k and "mask" not in k
                               else np.ones(s, np.int32), sh) for k, s in batch_shapes(cfg, run_cfg).items()}
    with shd.use_mesh(mesh, rules):
        state = init_train_state(model, cfg, run_cfg, opt, mesh, rules, jax.random.key(0))
    steps = {}
    if ab == "chunked_ce":
        for name, flag in (("logits", False), ("chunked", True)):
            obj = make_objective(model, cfg, run_cfg.train, chunked_ce=flag)
            steps[name] = make_train_step(model, cfg, run_cfg, opt, mesh=mesh, rules=rules, objective=obj)
    else:
        target, values = ab.split("=")
        mod_name, path = target.split(":")
        mod = importlib.import_module(mod_name)
        *owners, attr = path.split(".")  # ATTR may be a dotted path, e.g. Dense.__call__
        for name in owners:
            mod = getattr(mod, name)
        for v in values.split(","):
            def traced(step=make_train_step(model, cfg, run_cfg, opt, mesh=mesh, rules=rules), v=v):
                # patch only while tracing/compiling: the compiled program is cached per variant below
                old = getattr(mod, attr)
                setattr(mod, attr, _value(old, v))
                try:
                    with shd.use_mesh(mesh, rules):
                        return step.lower(state, batch).compile()
                finally:
                    setattr(mod, attr, old)
            steps[f"{path}={v}"] = traced()
    return steps, state, batch, mesh, rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--ab", default="chunked_ce")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    import jax

    from jaxtx import sharding as shd
    from jaxtx.train.config import load_run_config
    run_cfg = load_run_config(args.config, args.overrides)
    steps, state, batch, mesh, rules = build_steps(run_cfg, args.ab)
    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}  # process CPU seconds (all threads): less sensitive than wall time to other jobs
    with shd.use_mesh(mesh, rules):
        for name, step in steps.items():  # compile + one warm step each
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            print(f"{name}: first call {time.perf_counter() - t0:.1f} s, loss {float(m['loss']):.4f}", flush=True)
        for _ in range(args.reps):
            for name, step in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                state, m = step(state, batch)
                jax.block_until_ready(m)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    names = list(steps)
    for n in names:
        print(f"{n:<32} best {min(times[n]):.3f} s  median {statistics.median(times[n]):.3f} s  "
              f"all {' '.join(f'{t:.2f}' for t in times[n])}; CPU s best {min(cpu[n]):.3f} median "
              f"{statistics.median(cpu[n]):.3f}")
    a, b = names[0], names[-1]
    print(f"{b} / {a}: best {min(times[a]) / min(times[b]):.3f}x faster, "
          f"median {statistics.median(times[a]) / statistics.median(times[b]):.3f}x faster; CPU time best "
          f"{min(cpu[a]) / min(cpu[b]):.3f}x, median {statistics.median(cpu[a]) / statistics.median(cpu[b]):.3f}x")


if __name__ == "__main__":
    main()
