"""`jaxtx bench quant (--run DIR | --hf DIR | --config PRESET)`: what each weight format costs and buys, in one run.

Per scheme (f32 and bf16 weights, int8, int8 w8a8, fp8, int4-g128, nf4, nf4 + double quant): perplexity on held-out
tokens and its change against the float model, top-1 agreement with the float model's next token, weight bytes, and
greedy decode tokens/s at each --batch (new tokens / (time of N tokens - time of 1 token): prefill cancels).

Held-out tokens: --data FILE (text, through the model's tokenizer), else sequences sampled at temperature 1 from the
float model itself (its own distribution: perplexity of the float model there is its entropy, so the change is what
quantization costs). A --config preset has random weights: only bytes and speed mean anything then.
Timings are medians of --repeats after a warm-up; the machine is shared, so compare rows of one invocation.
"""
from __future__ import annotations

import argparse
import statistics
import time

SCHEMES = [("f32", None, {}), ("bf16", None, {}), ("int8", "int8", {}), ("int8-w8a8", "int8", {"w8a8": True}),
           ("fp8", "fp8", {}), ("int4-g128", "int4", {"group_size": 128}), ("nf4", "nf4", {}),
           ("nf4-dq", "nf4", {"double_quant": True})]


def register(sub) -> None:
    p = sub.add_parser("quant", help="quantized weights: perplexity change, top-1 agreement, bytes, decode tok/s",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR")
    src.add_argument("--hf", metavar="DIR")
    src.add_argument("--config", metavar="PRESET", help="random weights (speed and bytes only)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig overrides (--config)")
    p.add_argument("--data", metavar="FILE", help="held-out text (default: samples of the float model)")
    p.add_argument("--seqs", type=int, default=8, help="held-out sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--schemes", default=",".join(s[0] for s in SCHEMES), help="comma-separated subset")
    p.set_defaults(func=run)


def _load(args):
    import jax

    import jaxtx.model as model_lib
    from jaxtx.config import load_model_config
    if args.config:
        cfg = load_model_config(args.config, args.set).replace(dtype="float32", param_dtype="float32")
        model = model_lib.build(cfg)
        return model, model_lib.init_params(model, jax.random.key(0)), None
    from jaxtx.infer import loading
    loaded = loading.load_run(args.run) if args.run else loading.load_hf(args.hf)
    return loaded.model, loaded.params, loaded.tokenizer


def _heldout(args, model, params, tok):
    import jax.numpy as jnp
    import numpy as np

    from jaxtx import sampling
    from jaxtx.infer import generation
    B, T = args.seqs, args.seq_len
    if args.data:
        if tok is None:
            raise ValueError(f"--data {args.data}: the model has no tokenizer to read it with")
        ids = np.asarray(tok.encode(open(args.data, encoding="utf-8").read()), np.int32)
        if ids.size < B * T:
            raise ValueError(f"--data {args.data}: {ids.size} tokens, need --seqs x --seq-len = {B * T}")
        return jnp.asarray(ids[:B * T].reshape(B, T)), "text"
    start = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (B, 1)).tolist()
    out = generation.generate(model, params, start, max_new_tokens=T - 1, sampling=sampling.Sampling(temperature=1.0),
                              seed=1)
    rows = [list(s) + list(o)[:T - 1] for s, o in zip(start, out.tokens)]
    rows = [r + [r[-1]] * (T - len(r)) for r in rows]
    return jnp.asarray(np.asarray(rows, np.int32)), "float-model samples"


def _paired(long, short, repeats):
    """Median over repeats of (time of long - time of short), each pair run back to back: on a shared machine the
    difference of two separate medians drifts (even below 0)."""
    long(), short()  # compile
    diffs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        long()
        t1 = time.perf_counter()
        short()
        diffs.append((t1 - t0) - (time.perf_counter() - t1))
    return statistics.median(diffs)


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtx import quant
    from jaxtx.infer import generation

    wanted = args.schemes.split(",")
    unknown = [w for w in wanted if w not in [s[0] for s in SCHEMES]]
    if unknown:
        raise ValueError(f"--schemes: unknown {unknown}; expected names from {[s[0] for s in SCHEMES]}")
    model, params, tok = _load(args)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    model = model.clone(cfg=model.cfg.replace(dtype="float32", param_dtype="float32"))
    ids, source = _heldout(args, model, params, tok)
    fwd = jax.jit(lambda p, i: model.apply({"params": p}, i))
    ref = fwd(params, ids)

    def ppl(logits):
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        return float(jnp.exp(-jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))))

    base_ppl = ppl(ref)
    print(f"model {model.cfg.name}: L={model.cfg.n_layers} D={model.cfg.d_model} V={model.cfg.vocab_size}; held-out: "
          f"{source}, {ids.shape[0]} x {ids.shape[1]} tokens; backend {jax.default_backend()}")
    head = "| scheme | weights MiB | x f32 | ppl | Δppl | top-1 agree | " + \
           " | ".join(f"tok/s b={b} | x f32" for b in args.batch) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    f32_speed = {}
    for name, scheme, opts in SCHEMES:
        if name not in wanted:
            continue
        if scheme is None:
            p = params if name == "f32" else jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        else:
            p = quant.quantize_params(params, scheme, **opts)
        logits = fwd(p, ids)
        q_ppl = ppl(logits)
        agree = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(ref, -1)))
        row = [name, f"{quant.weight_bytes(p) / 2**20:.1f}",
               f"{quant.weight_bytes(p) / quant.weight_bytes(params):.2f}", f"{q_ppl:.3f}",
               f"{100 * (q_ppl / base_ppl - 1):+.2f}%", f"{agree:.3f}"]
        for b in args.batch:
            prompts = np.asarray(ids[:1, :8]).repeat(b, 0).tolist()

            def gen(n):
                return lambda: jax.block_until_ready(generation.generate(model, p, prompts, max_new_tokens=n,
                                                                         max_len=8 + args.new_tokens + 8).tokens)
            dt = _paired(gen(args.new_tokens), gen(1), args.repeats)
            speed = b * (args.new_tokens - 1) / max(dt, 1e-9)
            f32_speed.setdefault(b, speed)
            row += [f"{speed:.1f}", f"{speed / f32_speed[b]:.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)
    return 0
