"""`jaxtx bench decode CONFIG`: time-to-first-token and decode tokens/s, against the memory-bandwidth roofline and
(optionally) transformers' `generate` on the same weights-shape model in the same process.

    jaxtx bench decode tiny --set vocab_size=32000 d_model=768 n_layers=12 n_heads=12 n_kv_heads=12 d_ff=2048 \
        --baseline torch

Decode is memory-bound: every step reads all weights once and the whole KV cache once, so the roofline step time is
(weight bytes + KV bytes) / bandwidth, with the bandwidth measured here as a large on-device reduction (read-only).
Timings are medians of --repeats runs after one warm-up (compilation excluded); the machine is shared, so compare
the two systems from the same invocation.
"""
from __future__ import annotations

import argparse
import statistics
import time


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("decode", help="decode speed: TTFT, tokens/s, roofline, vs torch",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="model preset name or YAML path")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig overrides")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--int8-kv", action="store_true", help="int8 KV cache")
    p.add_argument("--baseline", choices=["none", "torch"], default="none")
    p.add_argument("--scan", action="store_true",
                   help="also time decode with the scanned layer stack (the training layout; the default decodes "
                        "unrolled, see infer.generation.for_decoding)")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="also time speculative greedy decoding at batch 1 with K drafted tokens per round")
    p.add_argument("--draft-layers", type=int, default=2,
                   help="the draft for --speculative: the target's first N layers with its embeddings and head "
                        "(self-speculation; no second checkpoint needed)")
    p.add_argument("--upper-scale", type=float, default=1.0,
                   help="--speculative with random weights: scale the output projections of the target's layers "
                        "above --draft-layers by this factor, so the truncated draft agrees with the target more "
                        "often (0 = always, the speedup ceiling; random weights otherwise give ~0%% acceptance)")
    p.set_defaults(func=run)


def _median_time(fn, repeats):
    fn()  # warm-up (compile)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _paired(ttft_fn, gen_fn, repeats):
    """(median TTFT, median per-pair (generate - TTFT)): pairing the two runs cancels most of the drift of a shared
    machine, which made the difference of two separate medians noisy (even negative)."""
    ttft_fn(), gen_fn()  # warm-up (compile)
    firsts, rests = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ttft_fn()
        t1 = time.perf_counter()
        gen_fn()
        t2 = time.perf_counter()
        firsts.append(t1 - t0)
        rests.append(max((t2 - t1) - (t1 - t0), 1e-9))
    return statistics.median(firsts), statistics.median(rests)


def _timed_row(name, B, roofline_s, ttft_fn, gen_fn, *, N, repeats, note=lambda ttft, step: ""):
    """Time one system (paired TTFT / generate runs), print its table row, return (ttft, step seconds)."""
    ttft, rest = _paired(ttft_fn, gen_fn, repeats)
    step = rest / (N - 1)
    print(f"{name:<8}{B:>6}{ttft * 1e3:>10.1f}{B / step:>14.1f}{step * 1e3:>9.2f}{roofline_s / step:>9.0%}"
          f"{note(ttft, step)}")
    return ttft, step


def measure_bandwidth(n_bytes=512 << 20, repeats=5) -> float:
    """Read bandwidth in bytes/s: a jitted sum over a float32 array much larger than the caches."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    t = _median_time(lambda: f(x).block_until_ready(), repeats)
    return n_bytes / t


def kv_int8_quality(model, params, ids_BT):
    """Logits with an int8 KV cache vs a float32 one over the same sequences (every position reads the quantized
    cache: the cached forward writes, then attends). Returns (mean KL(f32 || int8), top-1 agreement, max |dlogit|,
    cache bytes f32, cache bytes int8)."""
    import jax
    import jax.numpy as jnp

    from jaxtx.cache import KVCache
    B, T = ids_BT.shape
    pos = jnp.broadcast_to(jnp.arange(T)[None], (B, T))

    @jax.jit
    def fwd(p, ids):
        out = []
        for q in (False, True):
            c = KVCache.init(model.cfg, B, T, quantize=q)
            out.append((model.apply({"params": p}, ids, positions=pos, cache=c)[0], c.bytes()))
        return out

    (lf, bf), (lq, bq) = fwd(params, ids_BT)
    pf, pq = jax.nn.log_softmax(lf, -1), jax.nn.log_softmax(lq, -1)
    kl = jnp.mean(jnp.sum(jnp.exp(pf) * (pf - pq), -1))
    agree = jnp.mean(jnp.argmax(lf, -1) == jnp.argmax(lq, -1))
    return float(kl), float(agree), float(jnp.max(jnp.abs(lf - lq))), int(bf), int(bq)


def _jax_runner(model, params, B, T, N, quantize):
    import jax
    import numpy as np

    from jaxtx import decode
    from jaxtx.sampling import GREEDY
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.cfg.vocab_size, (B, T)).astype(np.int32)
    lens, live, seeds = np.full(B, T, np.int32), np.ones(B, bool), np.zeros(B, np.uint32)
    max_len = T + N
    full = decode.program(model)
    prefill = jax.jit(lambda p, i, l: decode.prefill(
        decode.step_fn(model, p), model.cfg, i, l, live, max_new=N, max_len=max_len, sampling=GREEDY,
        want_logprobs=False, quantize=quantize).logits.argmax(-1))

    def ttft():
        prefill(params, ids, lens).block_until_ready()

    def gen():
        out = full(params, ids, lens, live, seeds, None, None, None, max_new=N, max_len=max_len, sampling=GREEDY,
                   want_logprobs=False, quantize=quantize)
        out[0].block_until_ready()
    return ttft, gen


def _torch_runner(cfg, B, T, N):
    import torch
    import transformers
    lc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hd, max_position_embeddings=max(cfg.max_seq_len, T + N), rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta, attn_implementation="sdpa")
    torch.manual_seed(0)
    # on a GPU machine both systems run on the GPU (same process, same device)
    import jax
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    m = transformers.LlamaForCausalLM(lc).eval().to(device)
    ids = torch.randint(3, cfg.vocab_size, (B, T), device=device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def ttft():
        with torch.inference_mode():
            m.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **kw).cpu()

    def gen():
        with torch.inference_mode():
            out = m.generate(ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N, **kw).cpu()  # waits
        assert out.shape[1] == T + N
    return ttft, gen


def truncated_draft(model, params, n_layers):
    """(draft model, params): the first n_layers of the target, sharing its embeddings, final norm and head."""
    import jax

    from jaxtx import model as model_lib
    cfg = model.cfg
    if not cfg.scan_layers:
        raise ValueError("--speculative: the self-speculation draft needs a scan_layers model")
    dparams = dict(params, layers=jax.tree.map(lambda a: a[:n_layers], params["layers"]))
    return model_lib.build(cfg.replace(n_layers=n_layers)), dparams


def scale_upper_layers(params, n_layers, scale):
    """The residual-branch output kernels (attention out, MLP out) of layers >= n_layers, times scale."""
    import jax

    def f(path, a):
        names = [getattr(k, "key", "") for k in path]
        if names[:1] == ["layers"] and names[-1] == "kernel" and (names[-2] in ("o", "wo")):
            return a.at[n_layers:].multiply(scale)
        return a
    return jax.tree_util.tree_map_with_path(f, params)


def bench_speculative(model, params, T, N, k, n_layers, repeats, upper_scale=1.0):
    """Greedy target-only vs speculative at batch 1: (t_target, t_spec, acceptance, tokens per target pass)."""
    import numpy as np
    if upper_scale != 1.0:
        params = scale_upper_layers(params, n_layers, upper_scale)

    from jaxtx.infer import generate
    from jaxtx.infer.speculative import speculative_generate
    draft, dparams = truncated_draft(model, params, n_layers)
    prompt = [np.random.default_rng(2).integers(3, model.cfg.vocab_size, T).tolist()]
    ref = generate(model, params, prompt, max_new_tokens=N)
    res = speculative_generate(model, params, draft, dparams, prompt, max_new_tokens=N, k=k)
    if res.tokens != ref.tokens:
        raise AssertionError("speculative greedy output differs from target greedy output")
    t_ref = _median_time(lambda: generate(model, params, prompt, max_new_tokens=N), repeats)
    t_spec = _median_time(lambda: speculative_generate(model, params, draft, dparams, prompt, max_new_tokens=N, k=k),
                          repeats)
    return t_ref, t_spec, res.acceptance_rate, res.tokens_per_round


def _llama_style(cfg) -> bool:
    return (cfg.kind == "decoder" and cfg.position == "rope" and cfg.rope_scaling == "none" and cfg.norm == "rmsnorm"
            and cfg.activation == "silu" and cfg.gated and not cfg.is_moe and cfg.window is None
            and not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias))


def run(args) -> int:
    import jax
    import numpy as np

    from jaxtx import model as model_lib
    from jaxtx.config import load_model_config
    cfg = load_model_config(args.config, args.set)
    if cfg.kind != "decoder":
        raise ValueError(f"bench decode: needs a decoder-only config, got kind {cfg.kind!r}")
    model = model_lib.build(cfg)
    params = model_lib.init_params(model, jax.random.key(0))
    w_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    bw = measure_bandwidth()
    T, N = args.prompt_len, args.new_tokens
    print(f"model {cfg.name}: {sum(a.size for a in jax.tree.leaves(params)) / 1e6:.1f}M params "
          f"({w_bytes / 2**20:.0f} MiB), prompt {T}, {N} new tokens, greedy, KV {'int8' if args.int8_kv else 'f32'}; "
          f"measured read bandwidth {bw / 1e9:.1f} GB/s; backend {jax.default_backend()}")
    torch_ok = args.baseline == "torch"
    if torch_ok and not _llama_style(cfg):
        print("baseline torch: skipped (only Llama-style configs map onto transformers.LlamaForCausalLM)")
        torch_ok = False
    if torch_ok:
        try:
            import torch
            torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
        except ImportError:
            print("baseline torch: skipped (torch / transformers not installed)")
            torch_ok = False
    if args.int8_kv:
        ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, T)).astype(np.int32)
        kl, agree, dmax, bf, bq = kv_int8_quality(model, params, ids)
        print(f"int8 KV vs f32 KV over {T} positions: mean KL {kl:.2e} nats, top-1 agreement {agree:.1%}, "
              f"max |dlogit| {dmax:.3f}; cache {bq / bf:.0%} of f32 ({2 * bq / bf:.0%} of bf16)")
    hdr = f"{'system':<8}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'ms/step':>9}{'roofline':>10}"
    print(hdr)
    from jaxtx.infer.generation import for_decoding
    dmodel, dparams = for_decoding(model, params)
    for B in args.batch:
        itemsize = 1 if args.int8_kv else 4
        nbytes = w_bytes + 2 * cfg.n_layers * B * cfg.kv_heads * (T + N) * cfg.hd * itemsize  # read per step
        ttft, step = _timed_row("jaxtx", B, nbytes / bw, *_jax_runner(dmodel, dparams, B, T, N, args.int8_kv),
                                N=N, repeats=args.repeats)
        if args.scan:
            _timed_row("scanned", B, nbytes / bw, *_jax_runner(model, params, B, T, N, args.int8_kv), N=N,
                       repeats=args.repeats, note=lambda tt, t: f"   unrolled is {t / step:.2f}x faster")
        if torch_ok:
            _timed_row("torch", B, nbytes / bw, *_torch_runner(cfg, B, T, N), N=N, repeats=args.repeats,
                       note=lambda tt, t: f"   jaxtx/torch decode {t / step:.2f}x, TTFT {tt / ttft:.2f}x")
    if args.speculative:
        t_ref, t_spec, acc, per = bench_speculative(model, params, T, N, args.speculative, args.draft_layers,
                                                    args.repeats, args.upper_scale)
        print(f"speculative (batch 1, k={args.speculative}, draft = first {args.draft_layers} of {cfg.n_layers} "
              f"layers, upper layers x{args.upper_scale}): acceptance {acc:.1%}, {per:.2f} tokens per target pass, "
              f"{N / t_spec:.1f} tok/s vs {N / t_ref:.1f} target-only: speedup {t_ref / t_spec:.2f}x "
              "(tokens identical to target greedy)")
    return 0
