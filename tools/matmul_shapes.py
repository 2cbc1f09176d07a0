"""The matmul ceiling of the bench125m train step (issue 15): each dot shape of one layer (forward, and the two
backward products with their transposed operands) timed alone against the 2048^3 matmul, in process-CPU seconds
and wall seconds, and the step's matmul-only time: every dot of the step at its shape's best wall rate, attention's
batched dots at the square matmul's (an optimistic floor: no step can be faster on this machine's dot library).

    JAX_PLATFORMS=cpu python tools/matmul_shapes.py [--tokens 2048 --d 768 --f 2048 --v 32000 --layers 12 --seq 256]
"""
from __future__ import annotations

import argparse
import time


def cpu_rate(f, args, flops, reps=5):
    """(FLOPs per process-CPU second, FLOPs per wall second), each the best of `reps`."""
    import jax
    jax.block_until_ready(f(*args))
    cpu = wall = float("inf")
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(f(*args))
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - t0)
    return flops / cpu, flops / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--f", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    n, d, f, v = a.tokens, a.d, a.f, a.v
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    peak = cpu_rate(jax.jit(lambda x: x @ x), (ones(2048, 2048),), 2 * 2048 ** 3)
    rows = [("square 2048^3 (the peak)", peak)]
    floor = 0.0  # seconds: the step's dots, each at its shape's wall rate
    per_step = {"x @ W (D->F)": 2 * a.layers, "h @ W (F->D)": a.layers, "x @ W (D->D)": 4 * a.layers, "x @ W (D->V)": 1}
    for name, (m, k, o) in {"x @ W (D->F)": (n, d, f), "h @ W (F->D)": (n, f, d), "x @ W (D->D)": (n, d, d),
                            "x @ W (D->V)": (n, d, v)}.items():
        x, w, dy = ones(m, k), ones(k, o), ones(m, o)
        for label, fn, xs in ((f"{name} [{m},{k}]x[{k},{o}]", lambda x, w: x @ w, (x, w)),
                              ("  dx = dy @ W^T", lambda dy, w: dy @ w.T, (dy, w)),
                              ("  dW = x^T @ dy", lambda x, dy: x.T @ dy, (x, dy))):
            r = cpu_rate(jax.jit(fn), xs, 2 * m * k * o)
            rows.append((label, r))
            floor += per_step[name] * 2 * m * k * o / r[1]
    attn = 4 * 3 * n * a.seq * d * a.layers  # causal scores + p v, forward and backward (QK^T, PV: 2 fwd, 4 bwd)
    floor += attn / peak[1]
    print("GFLOP/s, best of 5: per process-CPU second / per wall second; share of the square matmul's")
    for name, (c, w) in rows:
        print(f"{name:<44} {c / 1e9:8.1f} {w / 1e9:8.1f}  {c / peak[0]:6.1%} {w / peak[1]:6.1%}")
    print(f"the step's dots ({a.layers} layers, attention {attn / 1e9:.0f} GFLOP at the peak): {floor:.2f} s of wall "
          "time at these rates (a floor for the step on this machine)")


if __name__ == "__main__":
    main()
