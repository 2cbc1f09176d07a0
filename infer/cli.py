"""`jaxtx generate`: text generation from a training run dir or a Hugging Face directory.

    jaxtx generate --run runs/tiny --prompt "def main():" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
    jaxtx generate --hf path/to/hf --prompts-file prompts.txt --beams 4
    jaxtx generate --run runs/big --draft runs/small --prompt "..."      # speculative decoding

A single prompt streams its text as it is produced; batches (--prompts-file, one prompt per line), beam search and
speculative decoding print each completion when the batch is done. Errors (prompt longer than the cache, ids outside
the vocabulary, empty prompt, draft/target vocabulary mismatch) are ValueErrors: `jaxtx` prints them and exits 2.
Heavy imports happen in `run`, so registering the command costs nothing for other subcommands.
"""
from __future__ import annotations

import argparse
import sys


def register_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a run dir or a Hugging Face model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a `jaxtx train` run dir (config.yaml, tokenizer, checkpoints)")
    src.add_argument("--hf", metavar="HF_DIR", help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --run (default: latest)")
    inp = p.add_mutually_exclusive_group(required=True)
    inp.add_argument("--prompt", help="prompt text")
    inp.add_argument("--prompts-file", metavar="FILE", help="one prompt per line: generate for all as a batch")
    inp.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids (models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-len", type=int, default=None, help="KV cache length (default: prompt bucket + new tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--beams", type=int, default=1, help="beam search with N beams (N > 1)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--draft", metavar="RUN_OR_HF_DIR", help="draft model for speculative decoding")
    p.add_argument("--draft-k", type=int, default=4, help="tokens proposed by the draft per round")
    p.add_argument("--int8-kv", action="store_true", help="int8 KV cache (per-token-per-head scales)")
    p.add_argument("--no-eos-prefix", action="store_true",
                   help="run dirs: do not start the prompt with EOS (training documents follow an EOS)")
    p.set_defaults(func=run)


def _prompts(args, tok, source, encoder_decoder=False):
    if args.prompt_ids is not None:
        try:
            return [[int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t != ""]], None
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    texts = [args.prompt] if args.prompt is not None else \
        open(args.prompts_file, encoding="utf-8").read().splitlines()
    if args.prompts_file is not None and not texts:
        raise ValueError(f"--prompts-file {args.prompts_file}: no prompts in the file")
    if tok is None:
        raise ValueError("this model directory has no tokenizer (tokenizer.model / tokenizer.json); pass --prompt-ids")
    rows = []
    for i, t in enumerate(texts):
        if not t:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to condition on")
        ids = tok.encode(t)
        has_eos = tok.eos_id is not None and tok.eos_id >= 0
        if encoder_decoder and has_eos:
            ids = ids + [tok.eos_id]  # T5 encoder inputs end with </s>, as transformers' tokenizer writes them
        elif source == "run" and not args.no_eos_prefix and has_eos:
            ids = [tok.eos_id] + ids
        elif source == "hf" and tok.bos_id is not None and tok.bos_id >= 0:
            ids = [tok.bos_id] + ids  # HF decoder tokenizers (Llama, Mistral) start prompts with <s>
        rows.append(ids)
    return rows, texts


def _sampling(args):
    from jaxtx.infer.sampling import Sampling
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                    presence_penalty=args.presence_penalty)


def run(args) -> int:
    from jaxtx.infer import loading

    loaded = loading.load_run(args.run, args.step) if args.run else loading.load_hf(args.hf)
    from jaxtx.infer.generation import for_decoding
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    if not args.draft:  # speculative decoding takes the scanned layout: its verify pass is multi-token anyway
        model, params = for_decoding(model, params)
    prompts, _ = _prompts(args, tok, loaded.source, model.cfg.kind == "encoder_decoder")
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocab_size={model.cfg.vocab_size}")
    eos = tok.eos_id if tok is not None and tok.eos_id is not None and tok.eos_id >= 0 else None
    stop_ids = [tok.encode(s) for s in args.stop] if tok is not None else []
    if args.stop and tok is None:
        raise ValueError("--stop needs a tokenizer (stop strings are matched on decoded text)")
    sampling = _sampling(args)
    decode = (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))

    if args.draft:
        from jaxtx.infer.speculative import speculative_generate
        d = loading.load_any(args.draft)
        if d.model.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"--draft {args.draft}: vocab_size={d.model.cfg.vocab_size} differs from the target's "
                             f"{model.cfg.vocab_size}; draft and target must share one tokenizer")
        res = speculative_generate(model, params, d.model, d.params, prompts, max_new_tokens=args.max_new_tokens,
                                   k=args.draft_k, sampling=sampling, seed=args.seed, stop=stop_ids, eos_id=eos)
        _print_all(res.tokens, decode, args.stop)
        print(f"[speculative: acceptance {res.acceptance_rate:.2f}, {res.tokens_per_round:.2f} tokens per target "
              f"pass]", file=sys.stderr)
        return 0
    if args.beams > 1:
        from jaxtx.infer.beam import beam_search
        res = beam_search(model, params, prompts, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                          length_penalty=args.length_penalty, eos_id=eos, max_len=args.max_len)
        _print_all(res.tokens, decode, args.stop)
        return 0
    if len(prompts) > 1:
        from jaxtx.infer import generate
        res = generate(model, params, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                       stop=stop_ids, eos_id=eos, max_len=args.max_len, quantize_kv=args.int8_kv)
        _print_all(res.tokens, decode, args.stop)
        return 0
    _stream_one(model, params, prompts[0], args, sampling, stop_ids, eos, decode)
    return 0


def _print_all(token_lists, decode, stop_strings):
    from jaxtx.infer.stop import truncate_text
    for i, toks in enumerate(token_lists):
        text, _ = truncate_text(decode(toks), stop_strings)
        if len(token_lists) > 1:
            print(f"=== {i}")
        print(text, flush=True)


def _stream_one(model, params, prompt, args, sampling, stop_ids, eos, decode):
    """Print text as tokens arrive: decode the whole output each step and print the new suffix (sentencepiece merges
    pieces across tokens, so per-token decoding would garble spaces and multi-byte characters)."""
    from jaxtx.infer import stream
    from jaxtx.infer.stop import truncate_text
    eos_set = {eos} if eos is not None else set()
    toks, shown, text = [], "", ""

    def emit(upto: str):
        nonlocal shown
        if upto.startswith(shown) and len(upto) > len(shown):
            sys.stdout.write(upto[len(shown):])
            sys.stdout.flush()
            shown = upto

    for step in stream(model, params, [prompt], max_new_tokens=args.max_new_tokens, sampling=sampling,
                       seed=args.seed, stop=stop_ids, eos_id=eos, max_len=args.max_len, quantize_kv=args.int8_kv):
        t = int(step[0])
        if t < 0 or t in eos_set:
            break
        toks.append(t)
        text, hit = truncate_text(decode(toks), args.stop)
        if hit:
            break
        # hold back an incomplete multi-byte character and any tail that may be the start of a stop string
        emit(text[: len(text) - _held(text, args.stop)])
    emit(text)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _held(text: str, stop_strings) -> int:
    """How many trailing characters to keep back: a partial UTF-8 character, or a suffix that begins a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for st in stop_strings:
        for n in range(min(len(st) - 1, len(text)), hold, -1):
            if st.startswith(text[-n:]):
                hold = n
                break
    return hold
