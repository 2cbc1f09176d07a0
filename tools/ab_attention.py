"""Attention fwd+bwd, "xla" (dense.py) vs "blockwise", alternating in one process: the CPU crossover (issue 15).

    JAX_PLATFORMS=cpu python tools/ab_attention.py [--sizes 128,256,512,1024] [--batch 8 --heads 12 --kv-heads 12]

Reports wall and process-CPU seconds (best and median of --reps) per backend and the blockwise / xla ratios;
the CPU time is the steadier number on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256,512,1024")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from jaxtx.kernels import attention
    B, H, K, Hd = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"B={B} H={H} K={K} Hd={Hd} f32 causal, fwd+bwd; best / median of {args.reps}")
    for T in map(int, args.sizes.split(",")):
        kq, kk, kv = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(kq, (B, T, H, Hd))
        k, v = jax.random.normal(kk, (B, T, K, Hd)), jax.random.normal(kv, (B, T, K, Hd))
        seg = jnp.ones((B, T), jnp.int32)  # as the train step calls it (packed documents)
        fns = {}
        for backend in ("xla", "blockwise"):
            def loss(q, k, v, backend=backend):
                return attention(q, k, v, causal=True, segment_ids=seg, backend=backend).sum()
            fns[backend] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            jax.block_until_ready(fns[backend](q, k, v))
        wall = {b: [] for b in fns}
        cpu = {b: [] for b in fns}
        for _ in range(args.reps):
            for b, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(f(q, k, v))
                wall[b].append(time.perf_counter() - t0)
                cpu[b].append(time.process_time() - c0)
        row = [f"T={T:5d}"]
        for b in fns:
            row.append(f"{b} wall {min(wall[b]) * 1e3:7.1f}/{statistics.median(wall[b]) * 1e3:7.1f} ms "
                       f"cpu {min(cpu[b]) * 1e3:7.1f}/{statistics.median(cpu[b]) * 1e3:7.1f} ms")
        row.append(f"blockwise/xla: wall {min(wall['blockwise']) / min(wall['xla']):.2f}x "
                   f"cpu {statistics.median(cpu['blockwise']) / statistics.median(cpu['xla']):.2f}x")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
