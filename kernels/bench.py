"""`jaxtx bench attention`: forward and forward+backward time of each attention backend, as TFLOP/s and ratios.

FLOPs count only visible (query, key) pairs, so a causal run is credited half the work of a full one ("causal FLOPs
counted once"): forward 4 * B * H * Hd * pairs (QK^T and PV), backward 2.5x that (five matmuls; the recompute of the
scores inside the flash backward is not credited). Ratios are time(reference) / time(backend): > 1 is faster than XLA.

CPU default: "xla" vs "blockwise" (add --interpret to time the GPU-style Pallas kernel in interpret mode at T <= 256;
interpret timings say nothing about GPU speed). GPU/TPU default: every backend that runs on the platform.
"""
from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_BACKENDS = {"cpu": ("xla", "blockwise"), "gpu": ("xla", "blockwise", "cudnn", "pallas_gpu"),
                    "tpu": ("xla", "blockwise", "pallas_tpu")}
INTERPRET_MAX_T = 256


def attention_flops(B, T, S, H, Hd, causal, window=None):
    """(forward, forward+backward) FLOPs over visible pairs (top-left aligned causal, as jaxtx defines it)."""
    import numpy as np

    i = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    vis = np.ones((T, S), bool)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= (i - j < window) & ((j - i < window) | causal)
    fwd = 4.0 * B * H * Hd * float(vis.sum())
    return fwd, 3.5 * fwd


def _time(fn, args, iters):
    import jax

    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_bench(*, sizes, backends, batch, heads, kv_heads, head_dim, dtype, causal, window, iters, modes,
              interpret=False):
    """Returns rows: dicts(backend, T, mode, ms, tflops, vs_xla, vs_cudnn) (ms None + error when a backend fails)."""
    import jax
    import jax.numpy as jnp

    from jaxtx.kernels.dispatch import attention

    rows = []
    for T in sizes:
        key = jax.random.PRNGKey(T)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (batch, T, heads, head_dim), jnp.float32).astype(dtype)
        k = jax.random.normal(kk, (batch, T, kv_heads, head_dim), jnp.float32).astype(dtype)
        v = jax.random.normal(kv, (batch, T, kv_heads, head_dim), jnp.float32).astype(dtype)
        flops = dict(zip(("fwd", "fwd+bwd"), attention_flops(batch, T, T, heads, head_dim, causal, window)))
        times = {}
        for backend in backends:
            interp = interpret and backend.startswith("pallas") and jax.default_backend() == "cpu"
            if interp and T > INTERPRET_MAX_T:
                continue
            f = jax.jit(lambda q, k, v, b=backend, i=interp: attention(q, k, v, causal=causal, window=window,
                                                                       backend=b, interpret=i))
            g = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
            for mode, fn in (("fwd", f), ("fwd+bwd", g)):
                if mode not in modes:
                    continue
                row = dict(backend=backend + (" (interpret)" if interp else ""), T=T, mode=mode, ms=None,
                           tflops=None, vs_xla=None, vs_cudnn=None, error=None)
                try:
                    sec = _time(fn, (q, k, v), iters)
                except Exception as e:  # noqa: BLE001 - report and keep benchmarking the others
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    rows.append(row)
                    continue
                times[(backend, mode)] = sec
                row.update(ms=sec * 1e3, tflops=flops[mode] / sec / 1e12)
                rows.append(row)
        for row in rows:
            if row["T"] != T or row["ms"] is None:
                continue
            for ref, col in (("xla", "vs_xla"), ("cudnn", "vs_cudnn")):
                if (ref, row["mode"]) in times:
                    row[col] = times[(ref, row["mode"])] / (row["ms"] / 1e3)
    return rows


def format_rows(rows, header):
    lines = [header, f"{'backend':<24}{'T':>7}  {'mode':<8}{'ms':>10}{'TFLOP/s':>10}{'vs xla':>8}{'vs cudnn':>9}"]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"{r['backend']:<24}{r['T']:>7}  {r['mode']:<8}  n/a: {r['error']}")
            continue
        fmt = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
        lines.append(f"{r['backend']:<24}{r['T']:>7}  {r['mode']:<8}{r['ms']:>10.2f}{r['tflops']:>10.4f}"
                     f"{fmt(r['vs_xla']):>8}{fmt(r['vs_cudnn']):>9}")
    return "\n".join(lines)


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    platform = jax.default_backend()
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    on_cpu = platform not in ("gpu", "tpu")
    default = DEFAULT_BACKENDS.get(platform, DEFAULT_BACKENDS["cpu"])
    backends = tuple(args.backends.split(",")) if args.backends else default
    if args.interpret and on_cpu and "pallas_gpu" not in backends:
        backends = backends + ("pallas_gpu",)
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else ([256, 512, 1024, 2048] if on_cpu else [1024, 2048, 4096, 8192]))
    dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
    modes = ("fwd", "fwd+bwd") if args.mode == "both" else (args.mode,)
    rows = run_bench(sizes=sizes, backends=backends, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                     head_dim=args.head_dim, dtype=dtype, causal=not args.no_causal, window=args.window,
                     iters=args.iters, modes=modes, interpret=args.interpret)
    header = (f"attention on {platform} ({jax.devices()[0].device_kind}): B={args.batch} H={args.heads} "
              f"K={args.kv_heads} Hd={args.head_dim} {dtype.name} causal={not args.no_causal} window={args.window}; "
              f"median of {args.iters}")
    print(format_rows(rows, header))
    return 0


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "attention", help="attention kernels: xla / blockwise / pallas / cudnn, TFLOP/s and ratios",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma-separated sequence lengths T (= S); default per platform")
    p.add_argument("--backends", default=None, help="comma-separated: xla,blockwise,pallas_gpu,pallas_tpu,cudnn")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    p.add_argument("--window", type=int, default=None, help="sliding window W")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd", "both"), default="both")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    p.add_argument("--interpret", action="store_true",
                   help=f"CPU: also run the Pallas GPU-style kernel in interpret mode (T <= {INTERPRET_MAX_T} only)")
    p.set_defaults(func=run)
