"""`jaxtx serve`: an OpenAI-compatible HTTP server on the engine.

    jaxtx serve --hf path/to/hf_model --port 8000
    jaxtx serve --run runs/tiny --chat-template chat.jinja --api-key sk-local
    jaxtx serve --hf path/to/hf_model --lora sql=adapters/sql --lora chat=adapters/chat   # model = base, sql or chat

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics (Prometheus).
Startup compiles every step bucket of the engine (nothing compiles while serving) and prints what it compiled, the KV
pages and their memory, and the URL. SIGTERM / SIGINT: stop accepting, let in-flight requests finish for --grace
seconds, abort the rest, exit 0.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a `jaxtx train` run dir (sentencepiece tokenizer)")
    src.add_argument("--hf", metavar="HF_DIR", help="a Hugging Face model directory (config.json, safetensors, "
                                                    "tokenizer.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --run (default: latest)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the `model` name clients send (default: the dir name)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter over the base as model NAME: a PEFT folder (adapter_config.json + "
                        "adapter_model.safetensors) or a `jaxtx train` LoRA run dir (its newest checkpoint; the base "
                        "served must be the one it trained on); repeatable: every adapter and the base share each "
                        "batch")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences decoded at once")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--num-pages", type=int, default=None, help="KV pages in the pool (default: max-seqs full-length "
                                                               "sequences)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens of one sequence "
                                                                   "(default: the model's max_seq_len)")
    p.add_argument("--max-tokens-per-step", type=int, default=256, help="token budget of one engine step")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per jitted loop when nothing waits")
    p.add_argument("--max-logprobs", type=int, default=20, help="most top alternatives a request may ask for "
                                                                 "(computed every step; 0 = chosen token only)")
    p.add_argument("--no-prompt-logprobs", action="store_true",
                   help="do not compile the prompt-scoring variant (halves warm-up; echo logprobs then 400)")
    p.add_argument("--int8-kv", action="store_true", help="int8 KV pages")
    p.add_argument("--chat-template", metavar="FILE", default=None, help="a jinja chat template (overrides the "
                                                                         "model's)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--max-queue", type=int, default=512, help="sequences in flight before 503 (default 512)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get at shutdown")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def _load(args):
    from pathlib import Path

    from jaxtx import run_dir as run_dir_lib
    from jaxtx.infer import loading
    from jaxtx.infer.server import tokenizer as tok_lib

    if args.run:
        loaded = loading.load_run(args.run, args.step)
        tok_file = run_dir_lib.tokenizer_file(args.run)  # the one reader of the run-dir layout
        if tok_file is None or tok_file.path.suffix != ".model":
            raise ValueError(f"--run {args.run}: no sentencepiece tokenizer in the run dir; the server needs one")
        tok = tok_lib.load_run_tokenizer(tok_file.path, prefix_ids=loaded.prompt_layout.prefix)
    else:
        loaded = loading.load_hf(args.hf)
        tok = tok_lib.load_hf_tokenizer(args.hf)
    if args.chat_template:
        tok.chat_template = Path(args.chat_template).read_text(encoding="utf-8")
        from jaxtx.infer.server.chat_template import compile_template
        compile_template(tok.chat_template)  # a syntax error fails startup, not every request
    if tok.vocab_size > loaded.model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} pieces but the model's vocab_size="
                         f"{loaded.model.cfg.vocab_size}")
    return loaded, tok


def parse_lora(values, base_name: str) -> list:
    """--lora NAME=DIR values -> [(name, Path)], checked before anything loads."""
    from pathlib import Path
    out: dict = {}
    for v in values:
        name, sep, folder = v.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise ValueError(f"--lora {v!r}: expected NAME=DIR (the model name clients send, a PEFT adapter folder "
                             "or a jaxtx LoRA run dir)")
        if name in out or name == base_name:
            raise ValueError(f"--lora {v!r}: the name {name!r} is already taken "
                             f"({'the base model' if name == base_name else 'another --lora'}); names must differ")
        if not Path(folder).is_dir():
            raise ValueError(f"--lora {v!r}: {folder} is not a directory (expected a PEFT adapter folder or a "
                             "jaxtx LoRA run dir)")
        out[name] = Path(folder)
    return list(out.items())


def load_adapters(model, params, loras) -> tuple[dict, dict]:
    """({name: params with that adapter} for Engine(adapters=...), {name: what was loaded, for the startup lines}).
    An adapter for another base is refused, naming it."""
    out, what, fingerprints = {}, {}, {}
    for name, folder in loras:
        try:
            out[name], what[name] = read_adapter(model, params, folder, fingerprints)
        except ValueError as e:  # PeftError and ConfigError are ValueErrors: their messages name file and tensor
            raise ValueError(f"--lora {name}={folder}: {e}") from None
    return out, what


def _as_layout(tree: dict, scanned: bool) -> dict:
    """A params-shaped tree in the scanned (one stacked `layers`) or unrolled (layers_0 ...) layout; a tree already
    in it is returned as it is."""
    from jaxtx.model import stack_layers, unstack_layers
    return stack_layers(tree) if scanned else unstack_layers(tree)


def read_adapter(model, params, folder, fingerprints: dict | None = None) -> tuple[dict, str]:
    """(params with the adapter in `folder` beside the base kernels, a description): the one reader of an adapter for
    serving. `folder` is a PEFT folder or a `jaxtx train` LoRA run dir (its newest checkpoint's adapter leaves, from
    jaxtx.run_dir.lora_run_adapters). A run dir records its base's fingerprint, and `params` must have it (in the
    run's layout and dtype): adapters over other weights would compute something nobody trained. `fingerprints`
    caches the served base's fingerprints across calls (one pass over the weights per layout)."""
    import jax

    from jaxtx import lora
    from jaxtx import run_dir as rd
    from jaxtx.layers.common import dtype_of
    if not rd.is_run_dir(folder):
        return lora.load_peft(model, params, folder)[1], "PEFT"
    rec = rd.lora_base_record(folder)
    if rec is None:
        raise ValueError("a jaxtx run dir without lora_base.json is a whole model, not an adapter: serve it with "
                         "--run, or give a PEFT folder or a LoRA run dir")
    if lora.has_lora(params):
        raise ValueError("the served base already holds a LoRA adapter (a LoRA run given as --run?): serve the base "
                         "that run trained on, or merge it first (jaxtx convert --from-jaxtx RUN)")
    cfg, adapters, rec = rd.lora_run_adapters(folder)
    version = int(rec.get("fingerprint_version", 1))
    key = (cfg.scan_layers, cfg.param_dtype, version)
    fingerprints = {} if fingerprints is None else fingerprints
    if key not in fingerprints:  # the served base as the run held it: its layout and param dtype
        dt = dtype_of(cfg.param_dtype)
        like = jax.tree.map(lambda x: x.astype(dt) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
                            _as_layout(params, cfg.scan_layers))
        fingerprints[key] = rd.base_fingerprint(like, version)
    now, want = fingerprints[key], rec.get("fingerprint")
    if now != want:
        raise ValueError(f"a LoRA run trained on the base {rec.get('source', '?')!r} (fingerprint {want}), but the "
                         f"base served has fingerprint {now}: serve that base (--run or --hf), or train this adapter "
                         "on the one served")
    step = rd.checkpoint_steps(folder)[-1]
    lcfg = (rd.read_config(folder) or {}).get("lora") or {}
    note = f", trained over its {lcfg['quantize']} base, served over the float one" if lcfg.get("quantize") else ""
    return lora.combine(params, _as_layout(adapters, model.cfg.scan_layers)), f"LoRA run, step {step}{note}"


def _kv_page_bytes(cfg, page_size: int, int8: bool) -> int:
    k = cfg.n_kv_heads or cfg.n_heads
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    per_token = 2 * cfg.n_layers * k * (hd * (1 if int8 else 4 if cfg.dtype == "float32" else 2) + (4 if int8 else 0))
    return per_token * page_size


def load(args):
    """(served name, [(adapter name, dir)], Loaded, tokenizer, model, params, {adapter name: params}, {adapter name:
    what it is}): everything `build` serves, before the engine compiles."""
    from pathlib import Path

    from jaxtx.infer.generation import for_decoding
    name = args.served_model_name or Path(args.run or args.hf).resolve().name
    loras = parse_lora(args.lora, name)
    loaded, tok = _load(args)
    model, params = for_decoding(loaded.model, loaded.params)  # unrolled layers decode faster (see for_decoding)
    adapters, what = load_adapters(model, params, loras)
    return name, loras, loaded, tok, model, params, adapters, what


def build(args):
    """(app, description lines): the model, engine (warmed up) and FastAPI app for these arguments."""
    from jaxtx.infer.engine import Engine, EngineConfig
    from jaxtx.infer.server.app import ServeConfig, create_app

    t0 = time.perf_counter()
    name, loras, _, tok, model, params, adapters, what = load(args)
    cfg = model.cfg
    max_len = args.max_model_len or cfg.max_seq_len
    num_pages = args.num_pages or args.max_seqs * -(-max_len // args.page_size)
    ecfg = EngineConfig(max_seqs=args.max_seqs, page_size=args.page_size, num_pages=num_pages,
                        max_tokens_per_step=args.max_tokens_per_step, max_model_len=max_len,
                        quantize_kv=args.int8_kv, decode_steps=args.decode_steps,
                        prompt_logprobs=not args.no_prompt_logprobs, max_logprobs=args.max_logprobs)
    t1 = time.perf_counter()
    engine = Engine(model, params, ecfg, adapters=adapters or None)
    t2 = time.perf_counter()
    config = ServeConfig(model_name=name, max_model_len=engine.max_model_len, model_vocab=cfg.vocab_size,
                         api_key=args.api_key, max_queue=args.max_queue,
                         adapters=tuple((n, str(folder)) for n, folder in loras))
    app = create_app(engine, tok, config)
    kv = getattr(engine, "kv_bytes", None) or num_pages * _kv_page_bytes(cfg, args.page_size, args.int8_kv)
    lines = [
        f"model      {name}: {cfg.n_layers} layers, D={cfg.d_model}, V={cfg.vocab_size}, max_model_len "
        f"{engine.max_model_len} (loaded in {t1 - t0:.1f} s)",
        f"compiled   {engine.compiled()} executables for token buckets {list(ecfg.token_buckets())}"
        + (f" and decode loops {list(ecfg.decode_buckets())}" if ecfg.decode_steps > 1 else "")
        + (" (+ prompt-logprob variants)" if ecfg.prompt_logprobs else "") + f" in {t2 - t1:.1f} s",
        f"KV cache   {num_pages} pages x {args.page_size} tokens, {kv / 2**20:.1f} MiB"
        + (" (int8)" if args.int8_kv else ""),
        f"chat       {'template loaded' if tok.chat_template else 'no chat template: /v1/chat/completions -> 400'}",
    ]
    if loras:  # before the chat line: tests read that one last
        lines.insert(-1, f"LoRA       {len(loras)} adapters over the base, one batch: "
                         + ", ".join(f"{n} ({folder}: {what[n]})" for n, folder in loras))
    return app, lines


def run(args) -> int:
    import uvicorn

    app, lines = build(args)
    for line in lines:
        print(line, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn re-raises the signal after its graceful shutdown (the process then dies "by SIGTERM"); a
            # requested shutdown that went cleanly should exit 0, so only record it
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=args.grace, access_log=args.log_level in ("info",
                                                                                                       "debug")))
    print(f"serving    http://{args.host}:{args.port}/v1  (OpenAI API; GET /health, /metrics)", flush=True)
    server.run()
    print("jaxtx serve: shut down cleanly", file=sys.stderr, flush=True)
    return 0
