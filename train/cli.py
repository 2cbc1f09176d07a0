"""`jaxtx train CONFIG [key=value ...]`: parse, train (or resume), print the summary. Exit codes: 0 done or cleanly
interrupted (rerun the same command to resume), 1 non-finite loss, 2 bad config or data."""
from __future__ import annotations

import os
import sys


def register_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model from a run config (resumes if its out_dir has checkpoints)",
                              description=__doc__)
    p.add_argument("config", help="run config: a YAML path, or a name under configs/ (tiny) or configs/runs/ (sft)")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. train.steps=200 model.n_layers=2 out_dir=runs/x")
    g = p.add_argument_group("multi-process (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")
    p.set_defaults(func=run)


def setup_jax_cache() -> None:
    """A persistent compilation cache: a resumed run (or a rerun) skips recompiling. JAXTX_COMPILATION_CACHE names
    another folder, or `off` (the test suite sets it: two pytest workers sharing one cache folder crashed reading
    and writing the same entry)."""
    import jax
    where = os.environ.get("JAXTX_COMPILATION_CACHE", "~/.cache/jaxtx-jit")
    if where.lower() == "off":
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(args) -> int:
    from jaxtx.config import ConfigError
    from jaxtx.train.config import load_run_config
    from jaxtx.train.loop import NonFiniteError, train
    from jaxtx.sharding import initialize_distributed
    try:
        # before any other jax use: jax.distributed must come first
        initialize_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                               getattr(args, "process_id", None))
        cfg = load_run_config(args.config, args.overrides)
        setup_jax_cache()
        out = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. out_dir on a read-only or full disk: the OS names the path
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out['status']} at step {out['step']} in {out['wall_s']:.0f} s; run dir {out['run_dir']}")
    if out["status"] != "done":
        print("rerun the same command to resume from the checkpoint just saved")
        return 0
    print(f"final train loss {out['train_loss']:.3f}, eval loss {out['eval_loss']:.3f} nats/token "
          f"(unigram entropy of the tokens {out['unigram_entropy']:.3f})")
    if out["skipped"]:
        print(f"{out['skipped']} non-finite updates were skipped")
    tty = sys.stdout.isatty()
    for prompt, cont in out["samples"]:  # the prompt (held-out text), then the model's greedy continuation
        print("-" * 60)
        print(f"{prompt}\033[1m{cont}\033[0m" if tty else f"[prompt]\n{prompt}\n[greedy continuation]\n{cont}")
    return 0
