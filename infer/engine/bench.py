"""`jaxtx bench serve CONFIG`: the serving engine on a mixed workload, against static-batch `generate` in the same run.

    jaxtx bench serve tiny --set vocab_size=32000 d_model=768 n_layers=12 n_heads=12 n_kv_heads=12 d_ff=2048 \
        --requests 64 --prompt-len 16 1024 --output-len 16 256 --rate 2

Workload: N requests with prompt and output lengths drawn uniformly (seeded), greedy, each with its own
max_new_tokens (the model is random, so no request stops early).
  offline   all requests arrive at t = 0
  poisson   arrivals with exponential gaps at --rate requests/s
  static    the same requests in arrival order, batches of --max-seqs through `jaxtx.infer.generate` (one call per
            batch, max_new_tokens = the batch's longest output; each request keeps its own length): static batching
  prefix    --prefix-requests requests sharing a --shared-prefix token system prompt, sent one at a time: time to
            first token with and without prefix caching
  lora      --lora N: the offline workload with N random LoRA adapters (rank --lora-rank, every linear layer)
            served together, request i on adapter i % N, against the base-only engine of the same run
Throughput counts output tokens / wall time. TTFT: arrival -> first token (static batching returns a whole batch at
once, so its first token arrives when the batch ends). TPOT: (finish - first token) / (tokens - 1) per request.
Every system runs once untimed first (compilation excluded).
"""
from __future__ import annotations

import argparse
import time

from jaxtx.argtypes import integer, real


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("serve", help="serving engine: throughput, TTFT, TPOT vs static batching",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="model preset name or YAML path")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig overrides")
    p.add_argument("--requests", type=integer(1), default=32)
    p.add_argument("--prompt-len", type=integer(1), nargs=2, default=[16, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=integer(1), nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    p.add_argument("--rate", type=real(0.0), default=0.0, help="Poisson arrival rate, requests/s (0: offline only)")
    p.add_argument("--max-seqs", type=integer(1), default=16)
    p.add_argument("--page-size", type=integer(1), default=16)
    p.add_argument("--num-pages", type=integer(0), default=0, help="pool size (0: every request's pages at once)")
    p.add_argument("--max-tokens-per-step", type=integer(1), default=256)
    p.add_argument("--decode-steps", type=integer(1), nargs="+", default=[8],
                   help="decode steps per jitted loop (several values: offline throughput of each; 1 = off)")
    p.add_argument("--shared-prefix", type=integer(0), default=512,
                   help="prefix workload: shared prompt tokens (0: skip)")
    p.add_argument("--prefix-requests", type=integer(2), default=8)
    p.add_argument("--no-static", action="store_true", help="skip the static-batching baseline")
    p.add_argument("--http", action="store_true", help="also the offline workload through `jaxtx serve` by "
                                                      "--concurrency streaming openai clients (HTTP overhead)")
    p.add_argument("--concurrency", type=int, default=64, help="--http: concurrent streams")
    p.add_argument("--lora", type=integer(0), default=0, metavar="N",
                   help="also serve the offline workload over N LoRA adapters in the same batches (0: skip)")
    p.add_argument("--lora-rank", type=integer(1), default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def workload(n, prompt_len, output_len, vocab, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    plen = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    olen = rng.integers(output_len[0], output_len[1] + 1, n)
    return [(rng.integers(3, vocab, int(p)).tolist(), int(o)) for p, o in zip(plen, olen)]


def pct(xs, q):
    import numpy as np
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def run_engine(engine, reqs, arrivals, adapters=None):
    """Serve reqs (prompt, max_new) arriving at `arrivals` seconds -> dict of per-request timings and wall time.
    adapters: each request's LoRA adapter name (None: the base for all)."""
    t0 = time.perf_counter()
    first, last, count, ids, nxt = {}, {}, {}, {}, 0
    peak_pages = 0
    while nxt < len(reqs) or engine.has_work():
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrivals[nxt] <= now:
            prompt, n = reqs[nxt]
            kw = {} if adapters is None else {"adapter": adapters[nxt]}
            ids[engine.add_request(prompt, max_new_tokens=n, seed=nxt, **kw)] = nxt
            nxt += 1
        if not engine.has_work():
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
            continue
        evs = engine.step()
        now = time.perf_counter() - t0
        peak_pages = max(peak_pages, engine.stats()["pages_used"])
        for ev in evs:
            i = ids[ev.request_id]
            if ev.token_ids:
                first.setdefault(i, now)
                last[i] = now
                count[i] = count.get(i, 0) + len(ev.token_ids)
    wall = time.perf_counter() - t0
    ttft = [first[i] - arrivals[i] for i in range(len(reqs))]
    tpot = [(last[i] - first[i]) / (count[i] - 1) for i in range(len(reqs)) if count[i] > 1]
    return dict(wall=wall, tokens=sum(count.values()), ttft=ttft, tpot=tpot, peak_pages=peak_pages)


def run_static(model, params, reqs, batch):
    """Static batching through infer.generate: batches in arrival order, all arriving at t = 0."""
    import numpy as np

    from jaxtx.infer import generate
    t0 = time.perf_counter()
    done, tokens, kv = [], 0, 0
    cfg = model.cfg
    for s in range(0, len(reqs), batch):
        chunk = reqs[s:s + batch]
        n = max(o for _, o in chunk)
        out = generate(model, params, [p for p, _ in chunk], max_new_tokens=n)
        t = time.perf_counter() - t0
        tokens += sum(min(len(tk), o) for tk, (_, o) in zip(out.tokens, chunk))
        done += [t] * len(chunk)
        B = 1 << (len(chunk) - 1).bit_length()
        S = max(16, 1 << (max(len(p) for p, _ in chunk) - 1).bit_length()) + n
        kv = max(kv, 2 * cfg.n_layers * B * cfg.kv_heads * S * cfg.hd * np.dtype(np.float32).itemsize)
    wall = time.perf_counter() - t0
    return dict(wall=wall, tokens=tokens, ttft=done, kv=kv)


def run(args) -> int:
    import jax
    import numpy as np

    from jaxtx import model as model_lib
    from jaxtx.config import load_model_config
    from jaxtx.infer.engine import Engine, EngineConfig
    from jaxtx.infer.generation import for_decoding

    for flag in ("prompt_len", "output_len"):
        lo, hi = getattr(args, flag)
        if lo > hi:
            raise ValueError(f"bench serve: --{flag.replace('_', '-')} {lo} {hi}: MIN must be <= MAX")
    cfg = load_model_config(args.config, args.set)
    if cfg.kind != "decoder":
        raise ValueError(f"bench serve: needs a decoder-only config, got kind {cfg.kind!r}")
    model, params = for_decoding(*((m := model_lib.build(cfg)), model_lib.init_params(m, jax.random.key(0))))
    reqs = workload(args.requests, args.prompt_len, args.output_len, cfg.vocab_size, args.seed)
    ps = args.page_size
    longest = max(len(p) + o for p, o in reqs)
    if args.shared_prefix:
        longest = max(longest, args.shared_prefix + 64 + args.output_len[0])
    num_pages = args.num_pages or sum(-(-(len(p) + o) // ps) for p, o in reqs) + 2 * -(-longest // ps)
    max_len = -(-longest // ps) * ps
    n_params = sum(a.size for a in jax.tree.leaves(params))
    print(f"model {cfg.name}: {n_params / 1e6:.1f}M params, {args.requests} requests, prompts "
          f"{args.prompt_len[0]}-{args.prompt_len[1]}, outputs {args.output_len[0]}-{args.output_len[1]} "
          f"({sum(o for _, o in reqs)} output tokens), greedy, max_seqs {args.max_seqs}, page {ps}, "
          f"{num_pages} pages, budget {args.max_tokens_per_step} tokens/step; backend {jax.default_backend()}")

    def make(decode_steps, prefix_caching=True, adapters=None):
        ecfg = EngineConfig(max_seqs=args.max_seqs, page_size=ps, num_pages=num_pages,
                            max_tokens_per_step=args.max_tokens_per_step, max_model_len=max_len,
                            decode_steps=decode_steps, prefix_caching=prefix_caching, max_logprobs=0)
        t = time.perf_counter()
        eng = Engine(model, params, ecfg, adapters=adapters)
        return eng, time.perf_counter() - t

    head = f"{'system':<22}{'tok/s':>9}{'wall s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}" \
           f"{'KV MiB':>9}"
    rows = []

    def row(name, r, kv):
        tps = r["tokens"] / r["wall"]
        tp = r.get("tpot", [])
        ttft = f"{pct(r['ttft'], 50) * 1e3:>8.0f}ms{pct(r['ttft'], 99) * 1e3:>8.0f}ms"
        print(f"{name:<22}{tps:>9.1f}{r['wall']:>9.2f}{ttft}"
              + (f"{pct(tp, 50) * 1e3:>8.1f}ms{pct(tp, 99) * 1e3:>8.1f}ms" if tp else f"{'-':>10}{'-':>10}")
              + f"{kv / 2**20:>9.1f}", flush=True)
        rows.append((name, tps))
        return tps

    print(head)
    zero = [0.0] * len(reqs)
    engines = {}
    for k in args.decode_steps:
        eng, warm = make(k)
        engines[k] = eng
        run_engine(eng, reqs, zero)  # untimed: the first calls of each executable and the host paths warm up
        r = run_engine(eng, reqs, zero)
        page_bytes = eng.kv_bytes / num_pages
        row(f"engine offline k={k}", r, r["peak_pages"] * page_bytes)
    eng = engines[args.decode_steps[0]]
    if args.lora:
        from jaxtx import lora
        lcfg = lora.LoraConfig(r=args.lora_rank, alpha=2.0 * args.lora_rank, target_modules="all-linear")
        names = [f"adapter{i}" for i in range(args.lora)]
        adapters = {}
        for i, n in enumerate(names):  # random b: a real adapter's cost (a zero b would cost the same, but say so)
            p = lora.add_lora(model, params, lcfg, jax.random.key(100 + i))
            adapters[n] = jax.tree_util.tree_map_with_path(
                lambda path, x: x + 0.01 if getattr(path[-1], "key", None) == "lora_b" else x, p)
        e, _ = make(args.decode_steps[0], adapters=adapters)
        per = [names[i % len(names)] for i in range(len(reqs))]
        run_engine(e, reqs, zero, per)
        r = run_engine(e, reqs, zero, per)
        tps = row(f"lora x{args.lora} r={args.lora_rank} k={args.decode_steps[0]}", r, r["peak_pages"] * e.kv_bytes
                  / num_pages)
        print(f"{args.lora} LoRA adapters (rank {args.lora_rank}, all-linear) mixed in every batch / base only: "
              f"{tps / rows[0][1]:.2f}x throughput")
    if args.http:
        from jaxtx.infer.server.bench import http_bench_model
        r = http_bench_model(model, params, reqs, concurrency=args.concurrency, engine_args=dict(
            max_seqs=args.max_seqs, page_size=ps, num_pages=num_pages, max_tokens_per_step=args.max_tokens_per_step,
            decode_steps=args.decode_steps[0], max_model_len=max_len))
        tps = row(f"http x{args.concurrency} k={args.decode_steps[0]}", r, 0)
        print(f"HTTP overhead vs engine offline: {100 * (1 - tps / rows[0][1]):.1f}% of throughput")
    if args.rate > 0:
        gaps = np.random.default_rng(args.seed + 1).exponential(1.0 / args.rate, len(reqs))
        r = run_engine(eng, reqs, np.cumsum(gaps).tolist())
        row(f"engine poisson {args.rate:g}/s", r, r["peak_pages"] * eng.kv_bytes / num_pages)
    if not args.no_static:
        run_static(model, params, reqs, args.max_seqs)  # compile every batch shape
        r = run_static(model, params, reqs, args.max_seqs)
        static_tps = row("static generate", r, r["kv"])
        print(f"engine offline / static batching: {rows[0][1] / static_tps:.2f}x")
    if args.shared_prefix:
        rng = np.random.default_rng(args.seed + 2)
        system = rng.integers(3, cfg.vocab_size, args.shared_prefix).tolist()
        preqs = [(system + rng.integers(3, cfg.vocab_size, int(rng.integers(16, 65))).tolist(), args.output_len[0])
                 for _ in range(args.prefix_requests)]
        res = {}
        for caching in (True, False):
            e, _ = make(args.decode_steps[0], caching)
            run_engine(e, preqs[:1], [0.0])  # the first request fills the cache (and warms the host paths)
            ttfts = [run_engine(e, [q], [0.0])["ttft"][0] for q in preqs[1:]]  # one at a time
            res[caching] = pct(ttfts, 50)
        print(f"shared {args.shared_prefix}-token prefix, {args.prefix_requests - 1} requests one at a time: "
              f"TTFT p50 {res[True] * 1e3:.0f} ms with prefix caching, {res[False] * 1e3:.0f} ms without "
              f"({res[False] / res[True]:.1f}x)")
    return 0
