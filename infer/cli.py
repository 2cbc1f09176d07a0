"""`jaxtx generate`: text generation from a jaxtx run dir or a Hugging Face directory.

    jaxtx generate --run runs/tiny --prompt "def main():" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
    jaxtx generate --hf path/to/hf --prompts-file prompts.txt --beams 4
    jaxtx generate --run runs/big --draft runs/small --prompt "..."      # speculative decoding

A prompt is fed exactly as the model was trained on prompts: the ids the run dir records around a user's text (or,
for an HF folder, what its tokenizer adds, e.g. BOS; T5's trailing EOS) wrap the tokenized text. --prompt-ids are fed
as given. A single prompt streams its text as it is produced; batches (--prompts-file, one prompt per line), beam
search and speculative decoding print each completion when the batch is done.

Every flag is range-checked, and a flag the chosen mode would ignore is refused rather than dropped (beam search is
deterministic: no --temperature, --seed, ...). A model with a learned position table (GPT-2) has max_seq_len
positions: --max-new-tokens is clamped to what fits, with a note, and a completion cut there says so on stderr.
Errors are one line on stderr and exit status 2. Heavy imports happen in `run`, so registering the command costs
nothing for other subcommands.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxtx.argtypes import integer, real

# Sampling flags (argparse dest -> flag). Their defaults are None, meaning "not given": a mode that would ignore a
# given flag refuses it instead. The values used when they are not given are Sampling's defaults.
SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                  "repetition_penalty": "--repetition-penalty", "frequency_penalty": "--frequency-penalty",
                  "presence_penalty": "--presence-penalty"}
FILTER_FLAGS = ("top_k", "top_p", "min_p")  # no effect under greedy decoding (temperature 0)
PENALTY_FLAGS = ("repetition_penalty", "frequency_penalty", "presence_penalty")


def register_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a run dir or a Hugging Face model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a jaxtx run dir (config.yaml, tokenizer, checkpoints)")
    src.add_argument("--hf", metavar="HF_DIR", help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--lora", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors) applied unmerged over the base")
    p.add_argument("--step", type=integer(minimum=0), default=None, help="checkpoint step of --run (default: latest)")
    inp = p.add_mutually_exclusive_group(required=True)
    inp.add_argument("--prompt", help="prompt text")
    inp.add_argument("--prompts-file", metavar="FILE", help="UTF-8 text, one prompt per line: generate for all as a "
                                                            "batch")
    inp.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, fed exactly as given (models "
                                                         "without a tokenizer)")
    p.add_argument("--max-new-tokens", type=integer(minimum=1), default=64,
                   help="at most this many new tokens (clamped, with a note, to the model's position limit)")
    p.add_argument("--max-len", type=integer(minimum=1), default=None,
                   help="KV cache length (default: prompt bucket + new tokens)")
    p.add_argument("--temperature", type=real(0.0), default=None, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=integer(minimum=0), default=None, help="sample from the k most likely (0 = off)")
    p.add_argument("--top-p", type=real(0.0, 1.0, low_open=True), default=None, help="nucleus mass in (0, 1]")
    p.add_argument("--min-p", type=real(0.0, 1.0), default=None, help="in [0, 1]: drop tokens below min_p x the top")
    p.add_argument("--repetition-penalty", type=real(0.0, low_open=True), default=None,
                   help="> 0; 1 = off (CTRL-style, over prompt + output)")
    p.add_argument("--frequency-penalty", type=real(), default=None, help="OpenAI-style; 0 = off")
    p.add_argument("--presence-penalty", type=real(), default=None, help="OpenAI-style; 0 = off")
    p.add_argument("--seed", type=integer(0, (1 << 32) - 1), default=None, help="sampling seed in [0, 2**32) "
                                                                                "(default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--beams", type=integer(minimum=1), default=1, help="beam search with N beams (N > 1)")
    p.add_argument("--length-penalty", type=real(), default=None,
                   help="beam search: rank hypotheses by logprob / length ** this (default 1.0)")
    p.add_argument("--draft", metavar="RUN_OR_HF_DIR", help="draft model for speculative decoding")
    p.add_argument("--draft-k", type=integer(minimum=1), default=None,
                   help="tokens proposed by the draft per round (default 4)")
    p.add_argument("--int8-kv", action="store_true", help="int8 KV cache (per-token-per-head scales)")
    p.set_defaults(func=run)


def _given(args, names) -> list[str]:
    return [SAMPLING_FLAGS.get(n, "--" + n.replace("_", "-")) for n in names
            if getattr(args, n) is not None and getattr(args, n) is not False]  # identity: 0 == False


def _refuse_given(args, what: str, flags: list, why: str) -> None:
    ignored = _given(args, flags)
    if ignored:
        raise ValueError(f"{what} cannot be combined with {', '.join(ignored)}: {why}")


def check_flags(args) -> None:
    """Refuse flag combinations where a flag would be silently ignored (ValueError naming the flags)."""
    if args.beams > 1:
        _refuse_given(args, f"--beams {args.beams}", list(SAMPLING_FLAGS) + ["seed", "int8_kv", "draft"],
                      "beam search is deterministic (it keeps the most likely hypotheses, nothing is sampled) and "
                      "uses a float KV cache; drop them, or sample with --beams 1")
    elif args.length_penalty is not None:
        raise ValueError(f"--length-penalty {args.length_penalty} only applies to beam search (--beams N, N > 1)")
    if args.draft:
        _refuse_given(args, "--draft", ["int8_kv", "max_len"] + list(PENALTY_FLAGS),
                      "speculative decoding sizes its own float KV caches, and its acceptance rule needs the "
                      "distributions of all k+1 positions at once, which penalties make depend on the drafts")
    elif args.draft_k is not None:
        raise ValueError(f"--draft-k {args.draft_k} only applies to speculative decoding (--draft DIR)")
    if not args.temperature:  # greedy: argmax of the (penalized) logits; the truncation filters cannot change it
        filters = _given(args, FILTER_FLAGS)
        if filters and args.beams == 1:
            raise ValueError(f"{', '.join(filters)}: no effect under greedy decoding (--temperature 0, the "
                             f"default); add --temperature T (T > 0) to sample")
    if args.hf and args.step is not None:
        raise ValueError(f"--step {args.step} only applies to --run (an HF folder holds one set of weights)")
    for s in args.stop:
        if not s:
            raise ValueError("--stop '': a stop string must not be empty")


def _sampling(args):
    from jaxtx.sampling import Sampling
    return Sampling(**{n: getattr(args, n) for n in SAMPLING_FLAGS if getattr(args, n) is not None})


def _read_prompts_file(path: str) -> list[str]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"--prompts-file {path}: no such file") from None
    except OSError as e:  # a directory, no permission, ...
        raise ValueError(f"--prompts-file {path}: cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"--prompts-file {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, "
                         f"line {line}); save it as UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"--prompts-file {path}: no prompts in the file (expected one prompt per line)")
    for i, t in enumerate(lines):
        if not t:
            raise ValueError(f"--prompts-file {path}: line {i + 1} is empty (one prompt per line; generation needs "
                             f"at least one token to condition on)")
    return lines


def _prompts(args, loaded) -> list[list[int]]:
    """The token ids fed to the model, one list per prompt."""
    if args.prompt_ids is not None:
        try:
            return [[int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t != ""]]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt '': the prompt is empty; generation needs at least one token to condition on")
    texts = [args.prompt] if args.prompt is not None else _read_prompts_file(args.prompts_file)
    tok = loaded.tokenizer
    if tok is None:
        raise ValueError("this model directory has no tokenizer (tokenizer.model / tokenizer.json); pass --prompt-ids")
    # exactly the ids the model saw around a prompt in training (run dir) or that its own tokenizer adds (HF)
    return [loaded.prompt_layout.apply(tok.encode(t)) for t in texts]


def position_cap(cfg, max_len) -> tuple[int | None, str]:
    """(the most positions a sequence may occupy, what sets it), or (None, "") when nothing does. A learned position
    table ends at max_seq_len; a --max-len cache without a sliding window holds max_len positions (a windowed cache
    is a ring buffer and never fills)."""
    caps = []
    if cfg.position == "learned":
        caps.append((cfg.max_seq_len, f"the model's position limit (max_seq_len={cfg.max_seq_len}: a learned "
                                      f"position table)"))
    if max_len is not None and cfg.window is None:
        caps.append((max_len, f"--max-len {max_len}"))
    return min(caps) if caps else (None, "")


def clamp_new_tokens(requested: int, longest: int, cap: int | None, what: str, reserve: int = 0) -> int:
    """max_new_tokens such that the longest prompt plus the new tokens (+ `reserve`, speculative decoding's
    look-ahead) fit `cap` positions; a note on stderr when it is lower than requested."""
    if cap is None or longest + requested + reserve <= cap:
        return requested
    fits = cap - longest - reserve
    if fits < 1:
        if reserve:
            raise ValueError(f"the longest prompt ({longest} tokens) + {reserve} look-ahead positions of speculative "
                             f"decoding leave no room under {what}: shorten the prompt or lower --draft-k")
        return 1  # the prompt fills every position: the one next token is still predicted from the last one
    print(f"jaxtx generate: note: --max-new-tokens {requested} clamped to {fits}: the longest prompt ({longest} "
          f"tokens) and the new tokens must fit {what}", file=sys.stderr)
    return fits


def _say_cut(reasons, lengths, max_new: int, clamped: bool, what: str) -> None:
    """Say on stderr which completions ended at the position limit (not at EOS or a stop string)."""
    if not clamped:
        return
    for i, (reason, n) in enumerate(zip(reasons, lengths)):
        if reason == "length" and n >= max_new:
            which = f"completion {i}" if len(reasons) > 1 else "the completion"
            print(f"jaxtx generate: {which} stopped at {what} after {n} new tokens (finish reason: length)",
                  file=sys.stderr)


def run(args) -> int:
    check_flags(args)  # before loading anything: a bad combination costs nothing
    from jaxtx.infer import loading

    if args.lora and args.run:
        from jaxtx import run_dir
        if run_dir.lora_base_record(args.run) is not None:  # its adapter is applied already; one at a time
            raise ValueError(f"--lora {args.lora}: --run {args.run} is a LoRA run, loaded with its own adapter; to "
                             "stack another, merge this one first (jaxtx convert --from-jaxtx RUN --to-hf --to DIR, "
                             "then --hf DIR --lora ADAPTER)")
    loaded = loading.load_run(args.run, args.step) if args.run else loading.load_hf(args.hf)
    if args.lora:  # the adapter sits beside the base kernels; the model itself is unchanged
        import dataclasses

        from jaxtx.lora import load_peft
        loaded = dataclasses.replace(loaded, params=load_peft(loaded.model, loaded.params, args.lora)[1])
    if getattr(loaded, "note", None):
        print(f"jaxtx generate: note: {loaded.note}", file=sys.stderr)
    from jaxtx.infer.generation import for_decoding
    model, params, tok = loaded.model, loaded.params, loaded.tokenizer
    if not args.draft:  # speculative decoding takes the scanned layout: its verify pass is multi-token anyway
        model, params = for_decoding(model, params)
    prompts = _prompts(args, loaded)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model's vocab_size={model.cfg.vocab_size}")
    eos = tok.eos_id if tok is not None and tok.eos_id is not None and tok.eos_id >= 0 else None
    if args.stop and tok is None:
        raise ValueError("--stop needs a tokenizer (stop strings are matched on decoded text)")
    stop_ids = [tok.encode(s) for s in args.stop] if tok is not None else []
    sampling = _sampling(args)
    seed = args.seed if args.seed is not None else 0
    decode = (lambda ids: tok.decode(ids)) if tok is not None else (lambda ids: " ".join(map(str, ids)))
    # T5: the prompt feeds the encoder; the decoder starts from one start token, so only that counts as positions
    longest = 1 if model.cfg.kind == "encoder_decoder" else max((len(p) for p in prompts), default=0)

    if args.draft:
        from jaxtx.infer.speculative import speculative_generate
        d = loading.load_any(args.draft)
        if d.model.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"--draft {args.draft}: vocab_size={d.model.cfg.vocab_size} differs from the target's "
                             f"{model.cfg.vocab_size}; draft and target must share one tokenizer")
        k = args.draft_k if args.draft_k is not None else 4
        cap, what = min((position_cap(m.cfg, None) for m in (model, d.model) if m.cfg.position == "learned"),
                        default=(None, ""))
        max_new = clamp_new_tokens(args.max_new_tokens, longest, cap, what, reserve=k + 1)
        res = speculative_generate(model, params, d.model, d.params, prompts, max_new_tokens=max_new, k=k,
                                   sampling=sampling, seed=seed, stop=stop_ids, eos_id=eos)
        _print_all(res.tokens, decode, args.stop)
        _say_cut(res.finish_reasons, [len(t) for t in res.tokens], max_new, max_new < args.max_new_tokens, what)
        print(f"[speculative: acceptance {res.acceptance_rate:.2f}, {res.tokens_per_round:.2f} tokens per target "
              f"pass]", file=sys.stderr)
        return 0
    cap, what = position_cap(model.cfg, args.max_len)
    max_new = clamp_new_tokens(args.max_new_tokens, longest, cap, what)
    clamped = max_new < args.max_new_tokens
    if args.beams > 1:
        from jaxtx.infer.beam import beam_search
        res = beam_search(model, params, prompts, num_beams=args.beams, max_new_tokens=max_new,
                          length_penalty=args.length_penalty if args.length_penalty is not None else 1.0,
                          eos_id=eos, max_len=args.max_len)
        _print_all(res.tokens, decode, args.stop)
        # a hypothesis shorter than max_new ended in EOS; one of max_new tokens was cut by the length
        _say_cut(["length"] * len(res.tokens), [len(t) for t in res.tokens], max_new, clamped, what)
        return 0
    if len(prompts) > 1:
        from jaxtx.infer import generate
        res = generate(model, params, prompts, max_new_tokens=max_new, sampling=sampling, seed=seed,
                       stop=stop_ids, eos_id=eos, max_len=args.max_len, quantize_kv=args.int8_kv)
        _print_all(res.tokens, decode, args.stop)
        _say_cut(res.finish_reasons, [len(t) for t in res.tokens], max_new, clamped, what)
        return 0
    reason, n = _stream_one(model, params, prompts[0], args, max_new, seed, sampling, stop_ids, eos, decode)
    _say_cut([reason], [n], max_new, clamped, what)
    return 0


def _print_all(token_lists, decode, stop_strings):
    from jaxtx.stop import truncate_text
    for i, toks in enumerate(token_lists):
        text, _ = truncate_text(decode(toks), stop_strings)
        if len(token_lists) > 1:
            print(f"=== {i}")
        print(text, flush=True)


def _stream_one(model, params, prompt, args, max_new, seed, sampling, stop_ids, eos, decode) -> tuple[str, int]:
    """Print text as tokens arrive: decode the whole output each step and print the new suffix (sentencepiece merges
    pieces across tokens, so per-token decoding would garble spaces and multi-byte characters).
    Returns (finish reason, new tokens produced)."""
    from jaxtx.infer import stream
    from jaxtx.stop import truncate_text
    eos_set = {eos} if eos is not None else set()
    toks, shown, text, reason = [], "", "", "length"

    def emit(upto: str):
        nonlocal shown
        if upto.startswith(shown) and len(upto) > len(shown):
            sys.stdout.write(upto[len(shown):])
            sys.stdout.flush()
            shown = upto

    for step in stream(model, params, [prompt], max_new_tokens=max_new, sampling=sampling, seed=seed,
                       stop=stop_ids, eos_id=eos, max_len=args.max_len, quantize_kv=args.int8_kv):
        t = int(step[0])
        if t < 0 or t in eos_set:
            reason = "stop"
            break
        toks.append(t)
        text, hit = truncate_text(decode(toks), args.stop)
        if hit:
            reason = "stop"
            break
        # hold back an incomplete multi-byte character and any tail that may be the start of a stop string
        emit(text[: len(text) - _held(text, args.stop)])
    emit(text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return reason, len(toks)


def _held(text: str, stop_strings) -> int:
    """How many trailing characters to keep back: a partial UTF-8 character, or a suffix that begins a stop string."""
    hold = 1 if text.endswith("\ufffd") else 0
    for st in stop_strings:
        for n in range(min(len(st) - 1, len(text)), hold, -1):
            if st.startswith(text[-n:]):
                hold = n
                break
    return hold
