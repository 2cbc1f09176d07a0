"""`jaxtx` command line. Core owns info, convert and bench; train, aot and generate come from their packages through
the `jaxtx.commands` entry points (and bench targets through `jaxtx.bench`), so core never imports train or infer."""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from jaxtx.argtypes import integer, real

EPILOG = """examples:
  jaxtx info llama3-8b --seq-len 8192
  jaxtx info tiny n_layers=2 d_model=128
  jaxtx train configs/tiny.yaml train.steps=100
  jaxtx generate --run runs/tiny --prompt "def main():"
  jaxtx convert --from-hf ./Llama-3-8B --to ./llama3-jaxtx
  jaxtx quantize --hf ./Llama-3-8B --scheme int4 --to ./llama3-int4
  jaxtx bench attention
"""


def _cmd_info(args) -> int:
    from jaxtx import sizing
    from jaxtx.config import load_model_config

    if args.kv_dtype not in sizing.DTYPE_BYTES:
        raise ValueError(f"--kv-dtype {args.kv_dtype!r}: expected one of {', '.join(sorted(sizing.DTYPE_BYTES))}")
    cfg = load_model_config(args.config, args.overrides)
    weights = None
    if args.weights:
        from jaxtx import quant
        weights = ["int8", "fp8", "int4-g128", "nf4", "nf4-dq"] if args.weights == "all" else args.weights.split(",")
        for w in weights:
            quant.parse_scheme(w)  # a bad name fails before any work
    print(sizing.report(cfg, seq_len=args.seq_len, batch=args.batch, kv_dtype=args.kv_dtype, compute=args.compute,
                        weights=weights))
    return 0


def _cmd_convert(args) -> int:
    from jaxtx import hf

    return hf.convert_main(args) or 0


def _register_core(sub) -> None:
    p = sub.add_parser("info", help="parameter counts, FLOPs, KV-cache and training memory of a model (no weights)",
                       description="Print sizes of a model preset without allocating weights: parameters by component "
                                   "(total and active per token for MoE), forward/training FLOPs per token, KV-cache "
                                   "bytes, training memory, and optionally the Chinchilla-optimal size for a budget.")
    p.add_argument("config", help="preset name under configs/models/ (e.g. tiny, llama3-8b) or a YAML path")
    p.add_argument("overrides", nargs="*", help="ModelConfig overrides, e.g. n_layers=2 window=4096")
    p.add_argument("--seq-len", type=integer(minimum=1), default=2048,
                   help="context length for FLOPs and KV cache (default 2048)")
    p.add_argument("--batch", type=integer(minimum=1), default=1, help="sequences for the KV-cache total (default 1)")
    p.add_argument("--kv-dtype", default="bfloat16", help="KV cache dtype: bfloat16, float16, float32, int8")
    p.add_argument("--compute", type=real(0.0, low_open=True), default=None,
                   help="a FLOP budget (> 0): print the Chinchilla-optimal N and D")
    p.add_argument("--weights", default=None, metavar="SCHEMES",
                   help="weight bytes per quantization scheme, comma-separated (int8, fp8, int4-g128, nf4, nf4-dq) "
                        "or 'all', next to bf16")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face safetensors and jaxtx (orbax)",
                       description="--from-hf DIR --to DIR writes a jaxtx checkpoint (orbax params + config); "
                                   "--from-jaxtx DIR --to-hf --to DIR writes a directory transformers can load. "
                                   "Only safetensors are read; pickle files are never loaded. The source is never "
                                   "written; a non-empty --to needs --force, and the new folder is written aside "
                                   "and renamed into place, so a failure leaves --to as it was.")
    try:
        from jaxtx import hf

        hf.add_convert_args(p)
    except ImportError as e:  # keep the rest of the CLI usable
        p.add_argument("_unavailable", nargs="*", help=f"unavailable: {e}")
    p.set_defaults(func=_cmd_convert)

    from jaxtx import quant_cli

    quant_cli.register(sub)


def _register_plugins(sub, group: str) -> None:
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # a plugin that cannot import should not break the other commands
            p = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e: _unavailable(e))
            continue
        register(sub)


def _unavailable(e) -> int:
    print(f"jaxtx: this command cannot run: {e}", file=sys.stderr)
    return 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxtx", description="jaxtx: a JAX functional model stack for transformer language models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_core(sub)
    _register_plugins(sub, "jaxtx.commands")
    bench = sub.add_parser("bench", help="benchmarks: attention kernels, training step, decoding",
                           description="Speed benchmarks, reported as ratios against a baseline run in the same "
                                       "process. Targets: "
                                       + ", ".join(e.name for e in entry_points(group="jaxtx.bench")))
    _register_plugins(bench.add_subparsers(dest="target", metavar="TARGET"), "jaxtx.bench")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from jaxtx.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("JAXTX_DEBUG"):
            raise
        print(f"jaxtx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
