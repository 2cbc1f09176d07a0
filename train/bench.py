"""`jaxtx bench train CONFIG [key=value ...] [--steps N] [--baseline torch]`: step time, tokens/s and MFU of the
jitted train step on random tokens (no data pipeline), optionally against the same Llama architecture, batch and
optimizer in HF transformers / PyTorch, run in the same process with the two systems' steps alternating, so both see
the same background load (the host's speed drifts by up to 2x over minutes; one system timed after the other read that
drift as a speed difference)."""
from __future__ import annotations

import statistics
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="benchmark the train step (tokens/s, MFU), optionally vs PyTorch",
                              description=__doc__)
    p.add_argument("config", help="run config (YAML path or name), e.g. configs/runs/bench125m.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=8 train.seq_len=256")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warmup steps)")
    p.add_argument("--baseline", choices=["torch"], default=None, help="also time LlamaForCausalLM in PyTorch")
    p.set_defaults(func=run)


def time_alternating(steppers: list, steps: int) -> list[tuple[float, float]]:
    """(median wall s, median process-CPU s) per stepper: one round of warmup, then `steps` rounds, each running
    every system's step once in turn."""
    wall, cpu = [[] for _ in steppers], [[] for _ in steppers]
    for i in range(steps + 1):
        for k, one_step in enumerate(steppers):
            t0, c0 = time.perf_counter(), time.process_time()
            one_step()
            if i:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def jax_stepper(run_cfg) -> tuple:
    """(one_step(), info): the train step compiled once (timed, and its memory analysed) and run once, on random
    tokens."""
    import jax
    import numpy as np

    from jaxtx import model as jmodel
    from jaxtx import sharding as shd
    from jaxtx import sizing
    from jaxtx.train import metrics
    from jaxtx.train.aot import analyze
    from jaxtx.train.loop import make_run_mesh, resolve_model_config
    from jaxtx.train.optim import make_optimizer
    from jaxtx.train.step import batch_shapes, init_train_state, make_train_step
    cfg = resolve_model_config(run_cfg)
    t = run_cfg.train
    model = jmodel.build(cfg)
    opt = make_optimizer(run_cfg.optim, max(t.steps, 100))
    mesh, rules = make_run_mesh(run_cfg)
    state = init_train_state(model, cfg, run_cfg, opt, mesh, rules, jax.random.key(0))
    step = make_train_step(model, cfg, run_cfg, opt, mesh=mesh, rules=rules)
    rng = np.random.default_rng(0)
    sh = shd.batch_sharding(mesh, rules)
    batch = {k: jax.device_put(rng.integers(4, cfg.vocab_size, s).astype(np.int32) if "mask" not in k and
                               "segment" not in k else np.ones(s, np.int32), sh)
             for k, s in batch_shapes(cfg, run_cfg).items()}
    t0 = time.perf_counter()
    with shd.use_mesh(mesh, rules):  # one compile: its buffer plan (the peak it will hold) and the program timed
        compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = analyze(compiled, 0)
    held = {"state": state}

    def one_step():
        with shd.use_mesh(mesh, rules):
            held["state"], m = compiled(held["state"], batch)
            held["loss"] = float(jax.block_until_ready(m)["loss"])

    one_step()
    peak = metrics.total_peak_flops(mesh.devices.flat)
    return one_step, {
        "system": f"jaxtx ({jax.default_backend()}, {cfg.dtype})", "compile_s": compile_s,
        "params": sum(x.size for x in jax.tree.leaves(state["params"])), "peak": peak,
        "flops_per_token": metrics.train_flops_per_token(cfg, t.seq_len), "peak_bytes": mem["total"],
        "arg_bytes": mem["arguments"], "temp_bytes": mem["temps"], "model_params": sizing.param_counts(cfg).total}


def torch_stepper(run_cfg) -> tuple:
    """The same architecture in HF transformers (LlamaForCausalLM), AdamW and clipping, float32, all CPU threads."""
    import os

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg, t = run_cfg.model_config(), run_cfg.train
    if cfg.kind != "decoder" or cfg.position != "rope" or cfg.norm != "rmsnorm" or not cfg.gated:
        raise SystemExit("--baseline torch compares Llama-style decoders (rope, rmsnorm, gated silu)")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).train()
    o = run_cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    ids = torch.randint(4, cfg.vocab_size, (t.batch_size, t.seq_len))

    def one_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)

    one_step()  # torch's first steps allocate (the jaxtx stepper runs one after compiling)
    return one_step, {"system": f"torch {torch.__version__} + transformers (cpu, float32)", "compile_s": 0.0,
                      "params": sum(p.numel() for p in model.parameters())}


def _row(info: dict, timing: tuple, run_cfg, j: dict) -> dict:
    tokens = run_cfg.train.batch_size * run_cfg.train.seq_len
    wall, cpu = timing
    return {**info, "step_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
            "mfu": tokens / wall * j["flops_per_token"] / j["peak"]}


def cpu_time_peak() -> float:
    """f32 matmul FLOPs per process-CPU-second x the host's cores: the peak in the units of the CPU-time columns.
    On a shared machine wall time measures the other jobs too; CPU time counts only this process's work (both
    systems' thread pools may spin while starved, so it is an approximation, read as a second opinion)."""
    import os

    from jaxtx.train import metrics
    return metrics.cpu_matmul_peak(clock=time.process_time) * (os.cpu_count() or 1)


def run(args) -> int:
    import os
    import sys

    from jaxtx.config import ConfigError
    from jaxtx.train.cli import setup_jax_cache
    from jaxtx.train.config import load_run_config
    try:
        run_cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_jax_cache()
    t = run_cfg.train
    systems = [jax_stepper(run_cfg)]
    if args.baseline == "torch":
        try:
            systems.append(torch_stepper(run_cfg))
        except ImportError as e:
            print(f"--baseline torch needs torch and transformers ({e})", file=sys.stderr)
            return 2
    if run_cfg.lora is not None:  # the same model fully fine-tuned, in the same rounds
        import dataclasses
        systems.append(jax_stepper(dataclasses.replace(run_cfg, lora=None)))
    timings = time_alternating([one for one, _ in systems], args.steps)
    j = systems[0][1]
    rows = [_row(info, tm, run_cfg, j) for (_, info), tm in zip(systems, timings)]
    full = rows.pop() if run_cfg.lora is not None else None
    j = rows[0]
    print(f"{run_cfg.model_preset} + overrides: {j['model_params'] / 1e6:.1f}M params, batch {t.batch_size} x "
          f"{t.seq_len}, "
          f"{j['flops_per_token'] / 1e6:.0f} MFLOP/token (train), peak {j['peak'] / 1e9:.0f} GFLOP/s "
          f"({'measured f32 matmul' if 'cpu' in j['system'] else 'chip table'}); median of {args.steps} steps, "
          "the systems' steps alternating")
    cpu_peak = cpu_time_peak()
    print(f"{'system':<44} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'compile s':>9} {'CPU s':>7} {'MFU(CPU)':>8}")
    for r in rows:  # MFU(CPU): the step's FLOPs per CPU-second x cores, against the matmul's (cpu_time_peak)
        mfu_cpu = j["flops_per_token"] * t.batch_size * t.seq_len / r["cpu_s"] * (os.cpu_count() or 1) / cpu_peak
        print(f"{r['system']:<44} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.1%} "
              f"{r['compile_s']:>9.1f} {r['cpu_s']:>7.2f} {mfu_cpu:>8.1%}")
    if len(rows) == 2:
        print(f"jaxtx / torch tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x (wall), "
              f"{rows[1]['cpu_s'] / rows[0]['cpu_s']:.2f}x (CPU time)")
    if full is not None:
        lora_vs_full(run_cfg, j, full)
    return 0


def lora_vs_full(run_cfg, lo: dict, full: dict) -> None:
    """With a `lora:` section: the same model, batch and optimizer fully fine-tuned in this process, beside the LoRA
    row: step time, trainable share, and the compiled step's memory (arguments + temporaries, XLA's plan)."""
    lc = run_cfg.lora
    name = f"LoRA r{lc.r} {lc.target_modules if isinstance(lc.target_modules, str) else ','.join(lc.target_modules)}"
    name += f" ({lc.quantize} base)" if lc.quantize else ""
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"\n{'run':<44} {'step ms':>9} {'trainable (share)':>20} {'peak MiB (args / temps)':>26}")
    for label, r in (("full fine-tune", full), (name, lo)):
        share = f"{r['params'] / 1e6:.2f}M ({100 * r['params'] / r['model_params']:.2f}%)"
        mem = f"{mib(r['peak_bytes']):.1f} ({mib(r['arg_bytes']):.1f} / {mib(r['temp_bytes']):.1f})"
        print(f"{label:<44} {r['step_s'] * 1e3:>9.1f} {share:>20} {mem:>26}")
    print(f"LoRA / full: step time {lo['step_s'] / full['step_s']:.2f}x, peak memory "
          f"{lo['peak_bytes'] / full['peak_bytes']:.2f}x")
