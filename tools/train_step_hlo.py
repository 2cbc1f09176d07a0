"""Deterministic evidence for train-step speed work (issue 15): compile one train step without running it and print
its compiled memory (memory_analysis) and op counts of the optimized HLO (transposes, copies, dots, fusions).

    JAX_PLATFORMS=cpu python tools/train_step_hlo.py configs/runs/bench125m.yaml [key=value ...] [--hlo out.txt]

Environment switches read by the code under test (e.g. JAXTX_CE_CHUNK) apply, so an A/B is two invocations.
"""
from __future__ import annotations

import argparse
import collections
import re
import time


def analyse(run_cfg, chunked_ce: bool = True) -> dict:
    from jaxtx import model as jmodel
    from jaxtx import sharding as shd
    from jaxtx.train.loop import make_run_mesh, resolve_model_config
    from jaxtx.train.optim import make_optimizer
    from jaxtx.train.step import abstract_batch, abstract_train_state, make_train_step
    cfg = resolve_model_config(run_cfg)
    model = jmodel.build(cfg)
    opt = make_optimizer(run_cfg.optim, run_cfg.train.steps)
    mesh, rules = make_run_mesh(run_cfg)
    with shd.use_mesh(mesh, rules):
        state = abstract_train_state(model, cfg, run_cfg, opt, mesh, rules)
        batch = abstract_batch(cfg, run_cfg, mesh, rules)
        from jaxtx.train.objectives import make_objective
        objective = make_objective(model, cfg, run_cfg.train, chunked_ce=chunked_ce)
        step = make_train_step(model, cfg, run_cfg, opt, mesh=mesh, rules=rules, objective=objective)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    return {"compile_s": compile_s, "text": text, "temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes,
            "out": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes, "counts": op_counts(text)}


_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
_LAYOUT_OPS = {"parameter", "transpose", "copy", "bitcast", "reshape", "broadcast", "constant"}


def _bytes(type_text: str) -> int:
    total = 0
    for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dt, 4)
    return total


def computations(hlo_text: str) -> tuple[dict[str, list], set[str]]:
    """The optimized HLO's computations: name -> [(is_root, op, type_text, rest of line)], and the names of the fused
    ones (bodies of fusions)."""
    comps, cur = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            cur = comps.setdefault(head.group(1), [])
        elif line.startswith("}"):
            cur = None
        elif cur is not None and line.startswith("  "):
            m = re.match(r"\s+(ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$", re.sub(r"/\*.*?\*/", "", line))
            if m:
                cur.append((bool(m.group(1)), m.group(4), m.group(3), m.group(5), m.group(2)))
    fused = {c for ins in comps.values() for *_, rest, _ in ins for c in re.findall(r"calls=%([\w.\-]+)", rest)}
    return comps, fused


def kind_of(comps: dict, op: str, rest: str) -> str | None:
    """dot | layout | elementwise | None (control flow, parameters, tuples) for one non-fused instruction."""
    if op == "fusion":
        body = comps.get(re.search(r"calls=%([\w.\-]+)", rest).group(1), [])
        body_ops = {o for _, o, *_ in body}
        root = next((o for r, o, *_ in body if r), None)
        if "dot" in body_ops or "convolution" in body_ops:
            return "dot"
        if body_ops <= _LAYOUT_OPS and root in ("transpose", "copy"):
            return "layout"
        return "elementwise"
    if op in ("dot", "convolution"):
        return "dot"
    if op in ("copy", "transpose"):
        return "layout"
    return None


def op_counts(hlo_text: str) -> collections.Counter:
    """What runs, from the optimized HLO: each instruction of a non-fused computation (the entry, while bodies,
    conditional branches) classified, with its output bytes under "<kind> MiB":
    dot (a fusion holding a dot, or a bare dot), layout (a transpose/copy fusion or a bare copy: pure data movement
    XLA inserts), elementwise (any other fusion), and the counts of while loops and conditionals."""
    comps, fused = computations(hlo_text)
    counts = collections.Counter()
    for name, ins in comps.items():
        if name in fused:
            continue
        for _, op, type_text, rest, _ in ins:
            kind = kind_of(comps, op, rest)
            if kind == "layout":
                body_ops = {o for _, o, *_ in comps.get((re.findall(r"calls=%([\w.\-]+)", rest) or [""])[0], [])}
                counts["layout transposes" if op == "transpose" or "transpose" in body_ops else "layout copies"] += 1
            elif op in ("while", "conditional"):
                counts[op] += 1
            if kind:
                counts[kind] += 1
                counts[kind + " MiB"] += _bytes(type_text) / 2 ** 20
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--hlo", help="write the optimized HLO text here")
    ap.add_argument("--logits-ce", action="store_true", help="the loss through the [B, T, V] logits (no chunking)")
    args = ap.parse_args()
    from jaxtx.train.config import load_run_config
    r = analyse(load_run_config(args.config, args.overrides), chunked_ce=not args.logits_ce)
    mib = 2 ** 20
    print(f"compile {r['compile_s']:.1f} s; memory: args {r['args'] / mib:.1f} MiB, out {r['out'] / mib:.1f} MiB, "
          f"alias {r['alias'] / mib:.1f} MiB, temp {r['temp'] / mib:.1f} MiB")
    c = r["counts"]
    for k in ("dot", "layout", "elementwise"):
        print(f"  {k:<12} {c.get(k, 0):>5} ops, {c.get(k + ' MiB', 0):>8.0f} MiB written")
    print(f"  (layout: {c.get('layout transposes', 0)} transposes, {c.get('layout copies', 0)} copies); "
          f"{c.get('while', 0)} while loops, {c.get('conditional', 0)} conditionals")
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(r["text"])


if __name__ == "__main__":
    main()
