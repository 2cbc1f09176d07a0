"""Checks and timings that need a real GPU: run on a lent GPU machine (`python tools/gpu_check.py [--quick]`).

1. Correctness at real sizes: every GPU attention backend (pallas_gpu = our Triton kernel, cudnn, blockwise, xla)
   forward and q/k/v gradients against the float32 XLA reference computed on upcast inputs, as
   ||out - ref|| / ||ref||; ragged paged attention (Triton) against its XLA path, bf16 and int8 pages.
2. Timings: `jaxtx bench attention`'s table (median wall time around block_until_ready, compile excluded) for
   several sizes, plus a block-size sweep of the Triton kernel.
Prints one table per part; the numbers go into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np


GPU_BACKENDS = ("xla", "blockwise", "cudnn", "pallas_gpu")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_attention(rows, *, B, T, H, K, Hd, dtype, causal=True, window=None, segments=False, backends=()):
    from jaxtx.kernels.dispatch import attention
    ks = jax.random.split(jax.random.key(T + H + Hd), 4)
    q = jax.random.normal(ks[0], (B, T, H, Hd), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, Hd), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, Hd), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, H, Hd), jnp.float32).astype(dtype)
    seg = None
    if segments:  # two packed documents per row, a ragged split
        seg = (jnp.arange(T)[None, :] >= jnp.array([T // 3, T // 2])[:B, None]).astype(jnp.int32) + 1
    kw = dict(causal=causal, window=window, segment_ids=seg)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731

    def fwd_bwd(backend, q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, backend=backend, **kw), q, k, v)
        return (o,) + vjp(do)

    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda *a: fwd_bwd("xla", *a))(up(q), up(k), up(v), up(do))
    desc = (f"B={B} T={T} H={H} K={K} Hd={Hd} {jnp.dtype(dtype).name} causal={causal} window={window} "
            f"segments={segments}")
    for backend in backends:
        try:
            out = jax.jit(lambda *a, b=backend: fwd_bwd(b, *a))(q, k, v, do)
            errs = [rel(o, r) for o, r in zip(out, ref)]
            finite = all(bool(jnp.isfinite(o.astype(jnp.float32)).all()) for o in out)
            rows.append((desc, backend, errs, finite, None))
        except Exception as e:  # noqa: BLE001 - report every backend
            rows.append((desc, backend, None, False, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))


def check_paged(rows, *, B, H, K, Hd, page, pages_per_seq, T=1, int8=False, window=None):
    """B sequences of T query tokens each (decode, T > 1: speculative verification) as one ragged step."""
    from jaxtx.kernels import ragged_paged_attention
    P = B * pages_per_seq
    ks = jax.random.split(jax.random.key(7), 5)
    q = jax.random.normal(ks[0], (B * T, H, Hd), jnp.float32).astype(jnp.bfloat16)
    kp = jax.random.normal(ks[1], (K, P, page, Hd), jnp.float32)
    vp = jax.random.normal(ks[2], (K, P, page, Hd), jnp.float32)
    meta = dict(kv_lens=jax.random.randint(ks[3], (B,), T, pages_per_seq * page + 1),
                page_table=jax.random.permutation(ks[4], P).reshape(B, pages_per_seq).astype(jnp.int32),
                cu_q_lens=jnp.arange(B + 1, dtype=jnp.int32) * T, num_seqs=jnp.int32(B))
    ksc = vsc = None
    if int8:
        ksc = jnp.max(jnp.abs(kp), -1) / 127
        vsc = jnp.max(jnp.abs(vp), -1) / 127
        kp = jnp.round(kp / ksc[..., None]).astype(jnp.int8)
        vp = jnp.round(vp / vsc[..., None]).astype(jnp.int8)
    else:
        kp, vp = kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16)
    args = (q, kp, vp)
    kw = dict(meta, k_scales=ksc, v_scales=vsc, window=window)
    ref = jax.jit(lambda *a: ragged_paged_attention(*a, backend="xla", **kw))(q.astype(jnp.float32), *args[1:])
    desc = f"paged B={B} T={T} H={H} K={K} Hd={Hd} page={page} S={pages_per_seq * page} int8={int8} window={window}"
    try:
        f = jax.jit(lambda *a: ragged_paged_attention(*a, backend="pallas_gpu", **kw))
        out = f(*args)
        t = _time(f, args)
        rows.append((desc, "pallas_gpu", [rel(out, ref)], bool(jnp.isfinite(out.astype(jnp.float32)).all()),
                     f"{t * 1e6:.0f} us"))
        g = jax.jit(lambda *a: ragged_paged_attention(*a, backend="xla", **kw))
        rows.append((desc, "xla", [rel(g(*args), ref)], True, f"{_time(g, args) * 1e6:.0f} us"))
    except Exception as e:  # noqa: BLE001
        rows.append((desc, "pallas_gpu", None, False, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"))


def _time(f, args, iters=20):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


FWD_SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
             (128, 128, 8, 3), (64, 128, 4, 3)]  # (block_q, block_k, num_warps, num_stages)
BWD_SWEEP = [(32, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2),
             (128, 128, 8, 2)]


def launch_sweep(B, T, H, K, Hd):
    """Forward configs timed alone; backward configs timed as fwd+bwd with the default forward."""
    from jax.experimental.pallas import triton as plgpu

    from jaxtx.kernels.dispatch import attention
    from jaxtx.kernels.flash_attention import gpu
    from jaxtx.kernels.flash_attention.common import BlockSizes
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, Hd), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, Hd), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, Hd), jnp.bfloat16)
    default_launch, d = gpu._launch, gpu.DEFAULT_BLOCK_SIZES
    out = []
    for mode, sweep in (("fwd", FWD_SWEEP), ("fwd+bwd", BWD_SWEEP)):
        for bq, bk, warps, stages in sweep:
            def launch(a, b, bq=bq, bk=bk, warps=warps, stages=stages):
                if (a, b) == (bq, bk):
                    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)
                return default_launch(a, b)
            gpu._launch = launch
            bs = (BlockSizes(bq, bk, d.bwd_q, d.bwd_k) if mode == "fwd"
                  else BlockSizes(d.block_q, d.block_k, bq, bk))
            f = jax.jit(lambda q, k, v, bs=bs: attention(q, k, v, causal=True, backend="pallas_gpu", block_sizes=bs))
            fn = f if mode == "fwd" else jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(),
                                                          argnums=(0, 1, 2)))
            try:
                out.append((mode, (bq, bk, warps, stages), _time(fn, (q, k, v), 10) * 1e3))
            except Exception as e:  # noqa: BLE001
                out.append((mode, (bq, bk, warps, stages), f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
            finally:
                gpu._launch = default_launch
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="one small correctness case per backend (smoke test)")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--sweep-only", action="store_true", help="only the Triton launch-parameter sweep")
    p.add_argument("--no-sweep", action="store_true", help="skip the Triton launch-parameter sweep")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    if args.sweep_only:
        return sweep()
    rows = Rows()
    cases = [dict(B=2, T=256, H=4, K=2, Hd=64, dtype=jnp.bfloat16)] if args.quick else [
        dict(B=2, T=2048, H=16, K=4, Hd=128, dtype=jnp.bfloat16),
        dict(B=2, T=2048, H=16, K=16, Hd=128, dtype=jnp.bfloat16, causal=False),
        dict(B=1, T=4096, H=8, K=8, Hd=64, dtype=jnp.bfloat16, window=1024),
        dict(B=2, T=1024, H=8, K=2, Hd=128, dtype=jnp.bfloat16, segments=True),
        dict(B=2, T=1000, H=8, K=8, Hd=80, dtype=jnp.float32),  # non-multiple sizes, f32
        dict(B=1, T=1024, H=4, K=4, Hd=256, dtype=jnp.bfloat16),  # wide heads: the 64x64 forward tile
    ]
    for c in cases:
        check_attention(rows, backends=GPU_BACKENDS, **c)
    paged = [dict(B=4, H=8, K=2, Hd=128, page=16, pages_per_seq=4)] if args.quick else [
        dict(B=16, H=32, K=8, Hd=128, page=16, pages_per_seq=256),
        dict(B=16, H=32, K=8, Hd=128, page=16, pages_per_seq=256, int8=True),
        dict(B=8, H=32, K=8, Hd=128, page=16, pages_per_seq=128, T=4),
        dict(B=8, H=16, K=16, Hd=128, page=32, pages_per_seq=64, window=512),
    ]
    for c in paged:
        check_paged(rows, **c)
    if not (args.quick or args.skip_bench):
        benchmarks(args)
    return 1 if rows.bad else 0


def report_row(row) -> bool:
    desc, backend, errs, finite, note = row
    e = "n/a" if errs is None else " / ".join(f"{x:.1e}" for x in errs)
    tol = 2e-2 if "bfloat16" in desc or "paged" in desc else 2e-3
    refused = errs is None and "cannot run these arguments" in (note or "")  # the dispatcher's own refusal
    ok = refused or (errs is not None and finite and max(errs) < tol)
    print(f"{desc:<78}{backend:<12}{e:<40}{str(finite):<8}{note or ''}{'' if ok else '  <-- FAIL'}", flush=True)
    return ok


class Rows(list):
    """Correctness rows, printed as they arrive (a run cut off by its time limit still shows what it measured)."""

    def __init__(self):
        super().__init__()
        self.bad = 0
        print(f"\n{'case':<78}{'backend':<12}{'rel err out / dq / dk / dv':<40}finite  note", flush=True)

    def append(self, row):
        super().append(row)
        self.bad += not report_row(row)


def benchmarks(args) -> None:
    from jaxtx.kernels.bench import format_rows, run_bench
    for B, H, K, Hd, sizes in [(2, 16, 16, 128, [1024, 2048, 4096, 8192]), (2, 32, 8, 128, [2048, 8192])]:
        r = run_bench(sizes=sizes, backends=GPU_BACKENDS, batch=B, heads=H, kv_heads=K, head_dim=Hd,
                      dtype=jnp.bfloat16, causal=True, window=None, iters=10, modes=("fwd", "fwd+bwd"))
        print("\n" + format_rows(r, f"attention B={B} H={H} K={K} Hd={Hd} bf16 causal"), flush=True)
    if not args.no_sweep:
        sweep()


def sweep() -> int:
    for T in (4096, 8192):
        print(f"\nTriton launch sweep, B=2 T={T} H=16 K=16 Hd=128 bf16 causal (block_q, block_k, warps, stages): ms")
        for mode, cfg, ms in launch_sweep(2, T, 16, 16, 128):
            print(f"  {mode:<8}{str(cfg):<20}{ms if isinstance(ms, str) else f'{ms:.2f}'}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
