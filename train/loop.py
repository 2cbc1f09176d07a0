"""`jaxtx train`: data -> model -> jitted steps -> checkpoints, metrics, eval, samples. Resumable at any moment.

Order matters: every check that protects files already on disk (out_dir, the resume rules of jaxtx.run_dir,
train.init_from) runs before anything is written, and every check that can fail on user input (config, data files,
tokenizer vs vocab, batch vs mesh) runs before the first compile. A run that fails before its first checkpoint removes
what it created. Exact resume rests on three things: the data iterator state is saved with every checkpoint, the step
RNG is a function of (seed, step), and metrics files are cut back to the restored step.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import yaml

from jaxtx import model as jmodel
from jaxtx import run_dir as rd
from jaxtx import sharding as shd
from jaxtx.config import ConfigError, ModelConfig
from jaxtx.train import data as jdata
from jaxtx.train import metrics as jmetrics
from jaxtx.train.checkpoint import Checkpointer
from jaxtx.train.config import SECTIONS, RunConfig
from jaxtx.train.objectives import make_objective
from jaxtx.train.optim import make_optimizer
from jaxtx.train.sample import context_before_response, greedy_generate, training_prompt_layout
from jaxtx.train import lora_run
from jaxtx.train.step import (init_train_state, lora_frozen, make_eval_step, make_train_step, state_shardings,
                              train_params)
from jaxtx.train.tokenizer import EOS

def _code_prompts(texts: list[str], n: int) -> list[str]:
    """Held-out code to continue: a `def` line and the line after it, from the first n eval files that have one
    (a bare keyword prompt says little about a small model; continuing real code shows what it learned)."""
    out = []
    for text in texts:
        lines = text.split("\n")
        for i, line in enumerate(lines[:-1]):
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and len(line) < 100:
                out.append("\n".join(lines[i:i + 2]) + "\n")
                break
        if len(out) == n:
            break
    return out or ["def main():\n"]


class NonFiniteError(RuntimeError):
    pass


def make_run_mesh(run_cfg: RunConfig):
    """The one place a training mesh is made: (mesh, rules) from the run's mesh section. Fixed sizes (no -1) that
    need fewer devices than the host has use the first ones (mesh.data=1: a single-device run anywhere)."""
    m = run_cfg.mesh
    sizes = [*m.ici, *m.dcn]
    devices = jax.devices()
    if -1 not in sizes and math.prod(sizes) < len(devices) and jax.process_count() == 1:
        devices = devices[:math.prod(sizes)]
    return shd.make_mesh(m, devices), shd.rules_for(m)


def resolve_model_config(run_cfg: RunConfig, platform: str | None = None):
    """The run's ModelConfig; on accelerators compute runs in bfloat16 (params stay float32) unless model.dtype is
    set explicitly. CPU keeps float32: bf16 matmuls are slower than f32 on CPUs."""
    cfg = run_cfg.model_config()
    platform = platform or jax.default_backend()
    if platform != "cpu" and "dtype" not in dict(run_cfg.model_overrides):
        cfg = cfg.replace(dtype="bfloat16")
    return cfg


def check_batch(run_cfg: RunConfig, mesh, rules) -> None:
    spec = shd.batch_sharding(mesh, rules).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    dp = math.prod(mesh.shape[a] for a in axes)
    B, A = run_cfg.train.batch_size, run_cfg.optim.grad_accum
    if (B // A) % dp:
        raise ConfigError(f"train.batch_size={B} (/ optim.grad_accum={A} = {B // A} rows per micro-batch) is not "
                          f"divisible by the data-parallel size {dp} (mesh axes {dict(mesh.shape)})")


def _defaults() -> dict:
    """Every section's defaults, resolved like config.yaml: a key an older config.yaml lacks counts as its default."""
    return {"model": ModelConfig().to_dict(), **{s: dataclasses.asdict(cls()) for s, cls in SECTIONS.items()}}


def _init_from(path: str) -> tuple[Path, int]:
    """(checkpoints folder, newest step) of train.init_from: a run dir or its checkpoints/ folder. Reads only."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"train.init_from={path!r}: no such folder (expected a jaxtx run dir or its checkpoints/)")
    ckpts = p / rd.CHECKPOINTS if (p / rd.CHECKPOINTS).is_dir() else p
    steps = rd.checkpoint_steps(ckpts)
    if not steps:
        raise ConfigError(f"train.init_from={path!r}: no finished checkpoint in {ckpts} (expected <step>/state)")
    return ckpts, steps[-1]


class _RunDir:
    """out_dir for this run: checked before anything is written, and on failure before the first checkpoint, what
    this run created is removed again (a folder it made, or the entries it added to a folder that was empty)."""

    def __init__(self, run_cfg: RunConfig, log, main_process: bool):
        self.path = Path(run_cfg.out_dir)
        self.main = main_process
        if not main_process:  # process 0 checks and writes; the others would race with its writes
            self.kind, self.top, self.before = "other", None, set()
            return
        self.kind = rd.check_out_dir(self.path)  # "new" | "run"; raises for a file or a foreign folder
        if self.kind == "run":
            for key, a, b in rd.check_resume(self.path, run_cfg.to_dict(), _defaults()):
                log(f"note: resuming with {key} changed from {a!r} to {b!r}")
            steps = rd.checkpoint_steps(self.path)
            if steps and run_cfg.data.tokenizer is None and not (self.path / rd.TOKENIZER).is_file():
                raise ConfigError(
                    f"{self.path / rd.TOKENIZER} is missing but {self.path / rd.CHECKPOINTS} holds steps {steps}: "
                    "their token ids mean nothing without the tokenizer they were trained with, and a new one "
                    "would map ids to other pieces. Put the file back (nothing was changed)")
        self.top = next((p for p in reversed([self.path, *self.path.parents]) if not p.exists()), None)
        self.before = set(self.path.iterdir()) if self.path.exists() else set()

    def create(self, run_cfg: RunConfig, layout: rd.PromptLayout) -> None:
        """A new run records its config and layout first, so even a run killed early is recognised as a run dir."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.kind == "new":
            self.record(run_cfg, layout)

    def record(self, run_cfg: RunConfig, layout: rd.PromptLayout) -> None:
        """config.yaml and the prompt layout as this run has them (a resumed run: after its checkpoint restored, so a
        refused resume leaves them as they were)."""
        if not self.main:
            return
        if rd.read_config(self.path) != run_cfg.to_dict():
            rd.write_config(self.path, run_cfg.to_dict())
        if rd.read_prompt_layout(self.path) != layout:
            rd.write_prompt_layout(self.path, layout)

    def undo(self) -> None:
        """After a failure: remove what this run made, unless a checkpoint exists (then it is a resumable run)."""
        if self.kind != "new" or rd.checkpoint_steps(self.path):
            return
        if self.top is not None:  # the folder (and any parents) did not exist: all of it is this run's
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for p in set(self.path.iterdir()) - self.before:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and exits cleanly."""

    def __init__(self):
        self.got = None
        self.old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.got = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train(run_cfg: RunConfig, log=print) -> dict:
    """Run (or resume) a training run. Returns a summary dict; raises ConfigError / NonFiniteError."""
    main_process = jax.process_index() == 0  # only process 0 logs and writes metrics; checkpoints are collective
    if not main_process:
        log = lambda *a, **k: None  # noqa: E731
    out = _RunDir(run_cfg, log, main_process)  # every check that protects existing files, before any write
    init = None
    hf_base = run_cfg.lora is not None and lora_run.is_hf_folder(run_cfg.train.init_from or "")  # LoRA on an HF base
    if run_cfg.train.init_from and not rd.checkpoint_steps(out.path) and not hf_base:  # a resumed run has its params
        init = _init_from(run_cfg.train.init_from)  # a typo or another model's checkpoint: refused before any write
        rd.check_init_fit(*init, rd.abstract_params(run_cfg.model_config()), f"train.init_from={init[0].parent}")
    try:
        return _train(run_cfg, out, init, log, main_process)
    except BaseException:
        out.undo()
        raise


def _train(run_cfg: RunConfig, out: _RunDir, init_from, log, main_process: bool) -> dict:
    t_start = time.time()
    cfg = resolve_model_config(run_cfg)
    t = run_cfg.train
    run_dir = out.path
    layout = training_prompt_layout(t.objective, EOS)
    out.create(run_cfg, layout)
    if init_from is not None and run_cfg.data.tokenizer is None and not (run_dir / rd.TOKENIZER).exists():
        # the init run's weights index its tokenizer's pieces: a tokenizer trained anew would remap them
        src = init_from[0].parent / rd.TOKENIZER
        if src.is_file():
            shutil.copyfile(src, run_dir / rd.TOKENIZER)
            log(f"tokenizer from {src}")
    data = jdata.prepare(run_cfg, cfg, run_dir)
    mesh, rules = make_run_mesh(run_cfg)
    check_batch(run_cfg, mesh, rules)

    model = jmodel.build(cfg)
    optimizer = make_optimizer(run_cfg.optim, t.steps)
    abstract, shardings = state_shardings(model, cfg, run_cfg, optimizer, mesh, rules)
    ckpt = Checkpointer(run_dir / rd.CHECKPOINTS, keep=t.keep_ckpts, async_save=t.async_ckpt)
    try:
        restored = ckpt.restore_latest(lora_run.checkpointed(abstract), log=log)  # LoRA: the adapters only
        base = None
        if "frozen" in abstract:  # LoRA: the frozen base, which must be the one this run's adapters were trained on
            if init_from is None and t.init_from and not lora_run.is_hf_folder(t.init_from):
                init_from = _init_from(t.init_from)
            base = lora_run.load_base(run_cfg, cfg, model, abstract, init_from, mesh, rules)
            lora_run.check_base(run_dir, run_cfg, base, main_process)
        if restored is not None:
            start, state, meta = restored
            if base is not None:
                state = {**state, "frozen": lora_frozen(cfg, run_cfg, base, shardings)}
            log(f"resuming from {ckpt.dir}/{start}")
        else:
            start, meta = 0, None
            init = base
            if init_from is None and t.init_from and base is None:  # every checkpoint was damaged and set aside
                # (a LoRA run has its base already: an HF folder has no checkpoints for _init_from to find)
                init_from = _init_from(t.init_from)
            if init_from is not None and base is None:
                # a LoRA run's checkpoints hold only adapters: its base with the adapter merged in
                init = rd.init_params(*init_from, abstract["params"], f"train.init_from={t.init_from}")
                log(f"params from {init_from[0]}/{init_from[1]}")
            state = init_train_state(model, cfg, run_cfg, optimizer, mesh, rules, jax.random.key(t.seed),
                                     params=init)
        out.record(run_cfg, layout)
    except BaseException:
        ckpt.close()
        raise

    # Each process loads exactly the global-batch rows its devices hold (processes that share rows, e.g. when a
    # tensor axis spans processes, load the same rows); the row block [lo, hi) is shard lo // (hi - lo).
    b_sh = shd.batch_sharding(mesh, rules)
    lo, hi = shd.process_rows(b_sh, t.batch_size)
    local_b, shard = hi - lo, (lo // (hi - lo), t.batch_size // (hi - lo))
    it = jdata.train_iterator(data.train_rows, run_cfg, local_b, data.span_fn, shard=shard)
    if meta is not None:
        it.set_state(meta["data"])
    objective = make_objective(model, cfg, t, mask_id=data.tokenizer.mask_id, tok_vocab=data.tokenizer.vocab_size)
    step_fn = make_train_step(model, cfg, run_cfg, optimizer, objective=objective, mesh=mesh, rules=rules,
                              shardings=shardings)
    eval_fn = make_eval_step(model, cfg, run_cfg, objective=objective)
    evals = jdata.eval_batches(data.eval_rows, run_cfg, local_b, data.span_fn, shard=shard)
    to_device = lambda b: {k: jax.make_array_from_process_local_data(b_sh, np.asarray(v)) for k, v in b.items()}  # noqa

    writer = jmetrics.MetricsWriter(run_dir, start, enabled=main_process)
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_token = jmetrics.train_flops_per_token(cfg, t.seq_len)
    peak = jmetrics.total_peak_flops(mesh.devices.flat)
    bar = None
    if t.progress and main_process:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
    clock = {"t": None, "step": start}
    last = {"loss": float("nan"), "eval_loss": float("nan")}

    def handle(step_no: int, m) -> None:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not m["finite"]:
            bad = "loss" if not math.isfinite(m["loss"]) else "grad_norm"
            if not t.skip_nonfinite:
                good = ckpt.steps()
                raise NonFiniteError(
                    f"non-finite {bad} at step {step_no} (loss={m['loss']}, grad_norm={m['grad_norm']}); the update "
                    f"was not applied and no checkpoint was written after it. Last good checkpoint: "
                    f"{good[-1] if good else 'none'} in {ckpt.dir}. Lower optim.lr, or set train.skip_nonfinite=true "
                    "to skip such updates and count them.")
            log(f"step {step_no}: non-finite {bad}, update skipped ({int(m['skipped'])} so far)")
        now = time.time()
        if clock["t"] is None:  # the first step includes compilation: start timing after it
            clock["t"], clock["step"] = now, step_no
        if bar is not None:
            bar.update(step_no - bar.n)
        if step_no % t.log_every and step_no != t.steps:
            return
        dt, ds = now - clock["t"], step_no - clock["step"]
        tps = tokens_per_step * ds / dt if ds and dt > 0 else float("nan")
        rec = {"step": step_no, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "tokens_per_s": tps,
               "mfu": tps * flops_per_token / peak if peak == peak else float("nan"),
               **{k: v for k, v in m.items() if k not in ("loss", "lr", "grad_norm", "finite", "tokens")}}
        writer.write("train", rec)
        clock["t"], clock["step"] = now, step_no
        last["loss"] = m["loss"]
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tps:,.0f}" if tps == tps else "-")

    def evaluate(step_no: int, params, ref) -> None:
        tot = n = 0.0
        for b in evals:
            s_, n_ = eval_fn(params, to_device(b), ref)
            tot, n = tot + float(s_), n + float(n_)
        loss = tot / max(n, 1.0)
        writer.write("eval", {"step": step_no, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
        last["eval_loss"] = loss

    prev_train, prev_eval = jmetrics.read_jsonl(run_dir / "metrics.jsonl"), jmetrics.read_jsonl(run_dir / "eval.jsonl")
    if prev_train:  # a rerun of a finished run reports what it had
        last["loss"] = prev_train[-1]["loss"]
    if prev_eval:
        last["eval_loss"] = prev_eval[-1]["eval_loss"]
    status, pending = "done", None
    with _Signals() as sig, shd.use_mesh(mesh, rules):
        try:
            saved = start
            for s in range(start, t.steps):
                if sig.got:
                    break
                batch = next(it)
                data_state = it.get_state()
                state, m = step_fn(state, to_device(batch))
                if pending is not None:
                    handle(*pending)
                pending = (s + 1, m)
                # 0 = off: only the final checkpoint / eval (a signal still checkpoints below)
                at_ckpt = (t.ckpt_every and (s + 1) % t.ckpt_every == 0) or s + 1 == t.steps
                at_eval = (t.eval_every and (s + 1) % t.eval_every == 0) or s + 1 == t.steps
                if at_ckpt or at_eval or sig.got:
                    handle(*pending)  # metrics of a checkpointed step are on disk before the checkpoint is
                    pending = None
                if at_eval:
                    evaluate(s + 1, train_params(state), state.get("ref_params"))
                if at_ckpt or sig.got:
                    ckpt.save(s + 1, lora_run.checkpointed(state), {"step": s + 1, "data": data_state})
                    saved = s + 1
            if pending is not None:
                handle(*pending)
            if sig.got:
                status = f"interrupted by {sig.got}"
                step_now = int(jax.device_get(state["step"]))
                if saved != step_now:  # the signal came between the check after a step and the next step
                    ckpt.save(step_now, lora_run.checkpointed(state), {"step": step_now, "data": it.get_state()})
        finally:
            ckpt.close()
            writer.close()
            if bar is not None:
                bar.close()
        step_done = int(jax.device_get(state["step"]))
        samples = _samples(model, cfg, train_params(state), data, run_cfg, layout) if status == "done" else []
    if status == "done" and main_process:
        jmetrics.plot_losses(run_dir, data.unigram_entropy)
    return {"status": status, "step": step_done, "train_loss": last["loss"], "eval_loss": last["eval_loss"],
            "unigram_entropy": data.unigram_entropy, "wall_s": time.time() - t_start, "samples": samples,
            "skipped": int(jax.device_get(state["skipped"])), "run_dir": str(run_dir), "params": train_params(state),
            "model": model, "tokenizer": data.tokenizer}


def _samples(model, cfg, params, data, run_cfg: RunConfig, layout: rd.PromptLayout) -> list[tuple[str, str]]:
    """(prompt, greedy continuation) pairs for decoder objectives, each prompt laid out as `jaxtx generate` lays out a
    user's text (the run's PromptLayout): held-out code or the first half of held-out documents, and for sft/dpo
    the context a held-out row gives the model before its response (which that layout reproduces; tested)."""
    t, tok = run_cfg.train, data.tokenizer
    if cfg.kind != "decoder" or t.samples < 1:
        return []
    if t.objective in ("sft", "dpo"):
        rows = data.eval_rows
        prompts = [context_before_response(rows, i) for i in range(min(t.samples, len(rows["tokens"])))]
    elif run_cfg.data.source == "stdlib":
        prompts = [layout.apply(tok.encode(p)) for p in _code_prompts(data.eval_texts, t.samples)]
    else:
        docs = [tok.encode(x) for x in data.eval_texts[:t.samples]]
        prompts = [layout.apply(ids[:min(32, max(1, len(ids) // 2))]) for ids in docs if ids]
    prompts = [p[:cfg.max_seq_len - 1] for p in prompts if p]
    if not prompts:
        return []
    n_new = max(1, min(t.sample_tokens, cfg.max_seq_len - max(len(p) for p in prompts)))
    outs = greedy_generate(model, params, prompts, n_new, eos_id=EOS)
    return [(tok.decode(p), tok.decode(o)) for p, o in zip(prompts, outs)]
