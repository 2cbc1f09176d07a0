"""Where one train step's time goes (issue 15): profile a step with jax.profiler and sum the op time per kind.

    JAX_PLATFORMS=cpu python tools/profile_train_step.py configs/runs/bench125m.yaml [key=value ...] [--top 25]

Kinds come from the compiled step's optimized HLO (tools/train_step_hlo.py's rule: a fusion holding a dot is "dot",
a transpose/copy fusion "layout", any other fusion "elementwise") and the part of the model an op's source metadata
names (the optimizer's ops carry "optax" frames, the loss "chunked_ce", attention "flash_attention"). Op time is
summed over threads, so with two cores it can exceed the wall time of the step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time


def hlo_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, part) for every instruction of a non-fused computation."""
    from train_step_hlo import computations, kind_of  # tools/ is on sys.path when run as a script
    comps, fused = computations(hlo_text)
    out = {}
    for cname, ins in comps.items():
        if cname in fused:
            continue
        for _, op, _, rest, name in ins:
            kind = kind_of(comps, op, rest) or ("control" if op in ("while", "conditional", "call") else "other")
            meta = re.search(r'op_name="([^"]*)"', rest)
            src = re.search(r'source_file="([^"]*)"', rest)
            where = (meta.group(1) if meta else "") + " " + (src.group(1) if src else "")
            part = next((p for p, keys in _PARTS if any(k in where for k in keys)), "other")
            out[name] = (kind, part)
    return out


_PARTS = (("optimizer", ("optax", "optim.py", "clip", "adam")),
          ("loss", ("chunked_ce", "objectives")),
          ("attention", ("flash_attention", "attention")),
          ("norm", ("rms_norm", "norm")),
          ("mlp", ("swiglu", "mlp")))


def main() -> None:
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--dump", help="write 'seconds kind part op' per op here, and the optimized HLO beside it")
    args = ap.parse_args()
    import jax

    from ab_train_step import build_steps
    from jaxtx import sharding as shd
    from jaxtx.train.config import load_run_config
    run_cfg = load_run_config(args.config, args.overrides)
    steps, state, batch, mesh, rules = build_steps(run_cfg, "chunked_ce")
    step = steps["chunked"]
    with shd.use_mesh(mesh, rules):
        text = step.lower(state, batch).compile().as_text()
        kinds = hlo_kinds(text)
        state, m = step(state, batch)
        jax.block_until_ready(m)
        log_dir = tempfile.mkdtemp(prefix="jaxtx_prof_")
        t0, c0 = time.perf_counter(), time.process_time()
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, m = step(state, batch)
                jax.block_until_ready(m)
        wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    trace = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            per_op[e["name"]] += e.get("dur", 0) / 1e6 / args.steps
    by_kind, by_part = collections.Counter(), collections.Counter()
    for name, s in per_op.items():
        if kinds[name][0] == "control":
            continue  # a while/conditional's time is its body's ops, counted there
        by_kind[kinds[name][0]] += s
        by_part[kinds[name][1], kinds[name][0]] += s
    total = sum(by_kind.values())
    print(f"step wall {wall:.2f} s, process CPU {cpu:.2f} s, op time (summed over threads) {total:.2f} s")
    print("| kind | op s | share |\n|---|---|---|")
    for k, s in by_kind.most_common():
        print(f"| {k} | {s:.2f} | {s / total:.1%} |")
    print("| part, kind | op s | share |\n|---|---|---|")
    for (p, k), s in by_part.most_common():
        print(f"| {p}, {k} | {s:.2f} | {s / total:.1%} |")
    if args.dump:
        with open(args.dump, "w") as f:
            f.writelines(f"{s:.6f} {kinds[n][0]} {kinds[n][1]} {n}\n" for n, s in per_op.most_common())
        with open(args.dump + ".hlo", "w") as f:
            f.write(text)
    print(f"top {args.top} ops:")
    for name, s in per_op.most_common(args.top):
        print(f"  {s * 1e3:9.1f} ms  {kinds[name][0]:<11} {kinds[name][1]:<10} {name}")


if __name__ == "__main__":
    main()
