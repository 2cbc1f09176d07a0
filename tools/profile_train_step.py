"""Where one train step's time goes (issue 15): profile a step with jax.profiler and sum the op time per kind.

    JAX_PLATFORMS=cpu python tools/profile_train_step.py configs/runs/bench125m.yaml [key=value ...] [--top 25]

Kinds come from the compiled step's optimized HLO (tools/train_step_hlo.py's rule: a fusion holding a dot is "dot",
a transpose/copy fusion "layout", any other fusion "elementwise") and the part of the step its op_name metadata names
(`_PARTS`). Op time is summed over threads: ops that run concurrently make it exceed the step's wall time; the
"some op running" figure is the union of their intervals.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time


def _dims(type_text: str) -> list[int]:
    m = re.search(r"\[([\d,]*)\]", type_text)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(comps: dict, op: str, type_text: str, rest: str, types: dict) -> float:
    """2 * output elements * contracted elements of the dot in this instruction (or in the fusion it calls)."""
    if op != "dot":
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        body = comps.get(calls.group(1), []) if calls else []
        inner = {n: t for _, _, t, _, n in body}
        return sum(dot_flops(comps, o, t, r, inner) for _, o, t, r, _ in body if o == "dot")
    lhs = re.match(r"%?([\w.\-]+)", rest).group(1)
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
    k = math.prod(_dims(types.get(lhs, ""))[int(d)] for d in contract.split(",") if d) if lhs in types else 0
    return 2.0 * math.prod(_dims(type_text)) * k


def hlo_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, part, flops) for every instruction of a non-fused computation."""
    from train_step_hlo import computations, kind_of  # tools/ is on sys.path when run as a script
    comps, fused = computations(hlo_text)
    out = {}
    for cname, ins in comps.items():
        if cname in fused:
            continue
        types = {n: t for _, _, t, _, n in ins}
        for _, op, type_text, rest, name in ins:
            kind = kind_of(comps, op, rest) or ("control" if op in ("while", "conditional", "call") else "other")
            meta = re.search(r'op_name="([^"]*)"', rest)
            src = re.search(r'source_file="([^"]*)"', rest)
            where = (meta.group(1) if meta else "") + " " + (src.group(1) if src else "")
            part = next((p for p, keys in _PARTS if any(k in where for k in keys)), "other")
            flops = dot_flops(comps, op, type_text, rest, types) if kind == "dot" else 0.0
            out[name] = (kind, part, flops)
    return out


# matched against the op_name metadata (the jax call path; XLA:CPU keeps no source file): train.step runs the
# optimizer inside a lax.cond and the chunked CE inside a lax.scan (a while loop)
_PARTS = (("optimizer", ("cond/branch",)),
          ("loss", ("while/body",)),
          ("norm", ("_norm/",)),
          ("attention", ("/attn/",)),
          ("mlp", ("/mlp/",)))


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
    per_op, runs = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            per_op[e["name"]] += e.get("dur", 0) / 1e6 / args.steps
            runs[e["name"]] += 1 / args.steps  # ops in a while body (the CE scan) run once per iteration
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events if e.get("ph") == "X" and e.get("name") in kinds
                   and kinds[e["name"]][0] != "control")
    busy, end, threads = 0.0, -1.0, collections.Counter(e.get("tid") for e in events if e.get("name") in kinds)
    gaps, last = [], ""
    for a, b, name in spans:  # the union of op intervals: time with at least one op running
        if a > end >= 0:
            gaps.append(((a - end) / 1e3, last, name))
        if b > end:
            busy += b - max(a, end)
            end, last = b, name
    busy /= 1e6 * args.steps
    kinds = {n: (k, p, f * runs[n]) for n, (k, p, f) in kinds.items()}
    by_kind, by_part, flops = collections.Counter(), collections.Counter(), collections.Counter()
    for name, s in per_op.items():
        if kinds[name][0] == "control":
            continue  # a while/conditional's time is its body's ops, counted there
        by_kind[kinds[name][0]] += s
        flops[kinds[name][0]] += kinds[name][2] * (s > 0)
        by_part[kinds[name][1], kinds[name][0]] += s
    total = sum(by_kind.values())
    print(f"step wall {wall:.2f} s, process CPU {cpu:.2f} s, op time (summed over threads) {total:.2f} s, "
          f"some op running {busy:.2f} s; op events on {len(threads)} threads")
    print("| kind | op s | share |\n|---|---|---|")
    for k, s in by_kind.most_common():
        rate = f", {flops[k] / s / 1e9:.0f} GFLOP/s over {flops[k] / 1e9:.0f} GFLOP" if flops[k] else ""
        print(f"| {k} | {s:.2f} | {s / total:.1%}{rate} |")
    print("| part, kind | op s | share |\n|---|---|---|")
    for (p, k), s in by_part.most_common():
        print(f"| {p}, {k} | {s:.2f} | {s / total:.1%} |")
    if args.dump:
        with open(args.dump, "w") as f:
            f.writelines(f"{s:.6f} {kinds[n][0]} {kinds[n][1]} {kinds[n][2] / 1e9:.3f}GF {n}\n"
                         for n, s in per_op.most_common())
        with open(args.dump + ".hlo", "w") as f:
            f.write(text)
    gaps.sort(reverse=True)
    print(f"idle gaps: {len(gaps)}, {sum(g for g, *_ in gaps) / args.steps:.0f} ms; largest: " +
          ", ".join(f"{g:.1f} ms {a} -> {b}" for g, a, b in gaps[:8]))
    print(f"top {args.top} ops:")
    for name, s in per_op.most_common(args.top):
        rate = f"{kinds[name][2] / s / 1e9:6.0f} GFLOP/s" if kinds[name][2] and s else " " * 14
        print(f"  {s * 1e3:9.1f} ms  {rate}  {kinds[name][0]:<11} {kinds[name][1]:<10} {name}")


if __name__ == "__main__":
    main()
