"""The matmul ceiling of the bench125m train step (issue 15): each dot shape of one layer (forward, and the two
backward products with their transposed operands) timed alone in process-CPU seconds against the 2048^3 matmul.

    JAX_PLATFORMS=cpu python tools/matmul_shapes.py [--tokens 2048 --d 768 --f 2048 --v 32000]
"""
from __future__ import annotations

import argparse
import time


def cpu_rate(f, args, flops, reps=5):
    import jax
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        jax.block_until_ready(f(*args))
        best = min(best, time.process_time() - c0)
    return flops / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--f", type=int, default=2048)
    ap.add_argument("--v", type=int, default=32000)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    n, d, f, v = a.tokens, a.d, a.f, a.v
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    peak = cpu_rate(jax.jit(lambda x: x @ x), (ones(2048, 2048),), 2 * 2048 ** 3)
    rows = [("square 2048^3 (the peak)", peak)]
    for name, (m, k, o) in {"x @ W (D->F)": (n, d, f), "h @ W (F->D)": (n, f, d), "x @ W (D->D)": (n, d, d),
                            "x @ W (D->V)": (n, d, v)}.items():
        x, w = ones(m, k), ones(k, o)
        rows.append((f"{name} [{m},{k}]x[{k},{o}]", cpu_rate(jax.jit(lambda x, w: x @ w), (x, w), 2 * m * k * o)))
        dy = ones(m, o)
        rows.append(("  dx = dy @ W^T", cpu_rate(jax.jit(lambda dy, w: dy @ w.T), (dy, w), 2 * m * k * o)))
        rows.append(("  dW = x^T @ dy", cpu_rate(jax.jit(lambda x, dy: x.T @ dy), (x, dy), 2 * m * k * o)))
    print("process-CPU GFLOP/s (x cores for wall-equivalent), best of 5; share of the square matmul")
    for name, r in rows:
        print(f"{name:<44} {r / 1e9:8.1f}  {r / peak:6.1%}")


if __name__ == "__main__":
    main()
