"""HTTP serving benchmark: one workload run on the engine directly and through `jaxtx serve` by concurrent streams.

    python -m jaxtx.infer.server.bench --hf DIR [--requests 64 --concurrency 64 --max-seqs 16 ...]
    (meant to back `jaxtx bench serve --http`: `add_args` + `run` are the hooks)

The workload is seeded: N requests with prompts of random token ids (lengths in [--prompt-min, --prompt-max]) and
greedy outputs of [--out-min, --out-max] tokens (EOS stops both paths the same way, so both produce the same tokens).
Direct: every request added to an in-process Engine at t=0, stepped to completion. HTTP: the same requests as
streaming /v1/completions calls from the official AsyncOpenAI client, --concurrency at a time, against a `jaxtx serve`
subprocess with the same engine settings. Reported per path: output tokens/s, TTFT and inter-token latency p50/p99,
and the HTTP overhead (1 - HTTP throughput / direct throughput).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import numpy as np


def add_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="HF_DIR")
    src.add_argument("--run", metavar="RUN_DIR")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=128)
    p.add_argument("--out-min", type=int, default=16)
    p.add_argument("--out-max", type=int, default=64)
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-tokens-per-step", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def workload(args, vocab: int):
    rng = np.random.default_rng(args.seed)
    return [(rng.integers(4, vocab, int(rng.integers(args.prompt_min, args.prompt_max + 1))).tolist(),
             int(rng.integers(args.out_min, args.out_max + 1))) for _ in range(args.requests)]


def _summary(name, t_total, ttft, itl, n_out):
    ms = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if len(xs) else float("nan")  # noqa: E731
    return dict(path=name, tok_s=n_out / t_total, ttft_p50=ms(ttft, 50), ttft_p99=ms(ttft, 99), itl_p50=ms(itl, 50),
                itl_p99=ms(itl, 99), out_tokens=n_out, seconds=t_total)


def run_direct(args, model, params, reqs, eos):
    from jaxtx.infer.engine import Engine, EngineConfig
    engine = Engine(model, params, EngineConfig(max_seqs=args.max_seqs, page_size=args.page_size,
                                                num_pages=_num_pages(args, reqs),
                                                max_tokens_per_step=args.max_tokens_per_step,
                                                decode_steps=args.decode_steps, max_model_len=_max_len(args),
                                                max_logprobs=0))
    for p, n in reqs:  # untimed: the first calls of each executable warm up, as for HTTP
        engine.add_request(p, max_new_tokens=n, eos_id=eos)
    while engine.has_work():
        engine.step()
    t0 = time.perf_counter()
    ids = {engine.add_request(p, max_new_tokens=n, eos_id=eos): i for i, (p, n) in enumerate(reqs)}
    first, last, itl, n_out, done = {}, {}, [], 0, 0
    while done < len(reqs):
        for ev in engine.step():
            i, now = ids[ev.request_id], time.perf_counter()
            if ev.token_ids:
                if i in first:
                    itl += [(now - last[i]) / len(ev.token_ids)] * len(ev.token_ids)
                else:
                    first[i] = now - t0
                last[i] = now
                n_out += len(ev.token_ids)
            done += ev.finished
            n_out -= ev.stop_len if ev.finished else 0  # the EOS is not counted by the server's usage either
    return _summary("direct", time.perf_counter() - t0, list(first.values()), itl, n_out)


def _word_tokenizer(vocab: int) -> str:
    """A tokenizer.json with one word per id (t0 t1 ...): a random-weight model served for benchmarking needs a
    tokenizer for its text, not a trained one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok.to_str()


def http_bench_model(model, params, reqs, *, concurrency: int, engine_args: dict, warm: bool = True) -> dict:
    """`jaxtx bench serve --http`: serve (model, params) with `jaxtx serve` (written to a temporary HF dir with a
    word-per-id tokenizer, no EOS: every request runs to its max_tokens) and send `reqs` [(prompt ids, max_new)] as
    streaming completions, `concurrency` at a time. Returns wall, tokens, ttft [s], tpot [s] (engine bench format).
    engine_args: max_seqs, page_size, num_pages, max_tokens_per_step, decode_steps, max_model_len."""
    import tempfile
    from pathlib import Path

    from jaxtx import hf
    with tempfile.TemporaryDirectory() as d:
        hf.save(model, params, d)
        (Path(d) / "tokenizer.json").write_text(_word_tokenizer(model.cfg.vocab_size))
        with _server(["--hf", d], engine_args, len(reqs)) as base:
            if warm:  # untimed: the first calls of each executable and the HTTP paths warm up
                asyncio.run(_http_load(base, "bench", reqs, concurrency))
            total, ttft, itl, n_out, tpot = asyncio.run(_http_load(base, "bench", reqs, concurrency))
    return dict(wall=total, tokens=n_out, ttft=ttft, tpot=tpot)


class _server:
    """A `jaxtx serve` subprocess on a free port for the duration of a with-block (yields its base URL)."""

    def __init__(self, src: list, engine_args: dict, n_requests: int):
        self.cmd = [sys.executable, "-m", "jaxtx", "serve", *src, "--served-model-name", "bench",
                    "--no-prompt-logprobs", "--max-queue", str(max(512, n_requests)), "--max-logprobs", "0"]
        for k, v in engine_args.items():
            self.cmd += [f"--{k.replace('_', '-')}", str(v)]

    def __enter__(self):
        import httpx
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(self.cmd + ["--port", str(port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=dict(os.environ), text=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jaxtx serve exited with {self.proc.returncode}: "
                                   f"{self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("jaxtx serve did not start within 900 s")
            time.sleep(0.5)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)


async def _http_load(base, name, reqs, concurrency):
    import openai
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    ttft, itl, n_out, tpot = [], [], [0], []

    async def one(prompt, n):
        async with sem:
            t0 = time.perf_counter()
            last = first = None
            count = 0
            # logprobs=0 only to learn how many tokens each chunk carries (the engine's multi-step decode sends
            # several per event): inter-token latency is a chunk's gap spread over its tokens, as for direct
            stream = await client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}, logprobs=0)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    n_out[0] += chunk.usage.completion_tokens
                k = len(chunk.choices[0].logprobs.tokens) if chunk.choices and chunk.choices[0].logprobs else 0
                if k:
                    if last is None:
                        ttft.append(now - t0)
                        first = now
                    else:
                        itl.extend([(now - last) / k] * k)
                    last = now
                    count += k
            if count > 1:
                tpot.append((last - first) / (count - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p, n) for p, n in reqs))
    total = time.perf_counter() - t0
    await client.close()
    return total, ttft, itl, n_out[0], tpot


def run_http(args, reqs):
    engine_args = dict(max_seqs=args.max_seqs, page_size=args.page_size, num_pages=_num_pages(args, reqs),
                       max_tokens_per_step=args.max_tokens_per_step, decode_steps=args.decode_steps,
                       max_model_len=_max_len(args))
    with _server(["--hf", args.hf] if args.hf else ["--run", args.run], engine_args, len(reqs)) as base:
        asyncio.run(_http_load(base, "bench", reqs, args.concurrency))  # untimed warm-up, as for direct
        total, ttft, itl, n_out, _ = asyncio.run(_http_load(base, "bench", reqs, args.concurrency))
    return _summary(f"http x{args.concurrency}", total, ttft, itl, n_out)


def _max_len(args) -> int:
    return args.prompt_max + args.out_max


def _num_pages(args, reqs) -> int:
    return args.max_seqs * -(-_max_len(args) // args.page_size) + 1


def run(args) -> int:
    from jaxtx.infer import loading
    from jaxtx.infer.generation import for_decoding
    from jaxtx.infer.server import tokenizer as tok_lib

    loaded = loading.load_hf(args.hf) if args.hf else loading.load_run(args.run)
    model, params = for_decoding(loaded.model, loaded.params)
    tok = tok_lib.load_hf_tokenizer(args.hf) if args.hf else None
    eos = list(tok.eos_ids) if tok is not None else None
    vocab = tok.vocab_size if tok is not None else model.cfg.vocab_size
    reqs = workload(args, vocab)
    rows = [run_direct(args, model, params, reqs, eos), run_http(args, reqs)]
    print(f"{'path':<10} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'tokens':>7}")
    for r in rows:
        print(f"{r['path']:<10} {r['tok_s']:8.1f} {r['ttft_p50']:8.1f}ms {r['ttft_p99']:8.1f}ms {r['itl_p50']:7.1f}ms "
              f"{r['itl_p99']:7.1f}ms {r['out_tokens']:7d}")
    print(f"HTTP overhead at {args.concurrency} streams: {100 * (1 - rows[1]['tok_s'] / rows[0]['tok_s']):.1f}% "
          f"of direct throughput")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    sys.exit(run(ap.parse_args()))
