"""The jaxtx run dir: the one module that knows its layout. `jaxtx train` writes it through here, `jaxtx generate`,
`jaxtx convert` and jaxtx.infer read it through here.

    RUN_DIR/config.yaml               the resolved run config; its `model:` section lists every ModelConfig field
                                      (+ `preset`). A converted HF model has a `tokenizer:` section instead of `data:`
    RUN_DIR/tokenizer.model           sentencepiece model (used when data.tokenizer is null; a converted HF model may
                                      hold tokenizer.json / spiece.model instead, named by `tokenizer.file`)
    RUN_DIR/prompt_layout.json        PromptLayout: the token ids training put around a user's text
    RUN_DIR/lora_base.json            a LoRA run only: its frozen base (source, kind, path, step/seed) and the base's
                                      fingerprint; checkpoints then hold only the adapters (load_params adds the base)
    RUN_DIR/checkpoints/<step>/state  orbax pytree {"step", "params", "opt_state", ...} (a converted model: {"params"})
    RUN_DIR/checkpoints/<step>/meta   JSON {"step", "data": iterator state} (training only)
    RUN_DIR/unreadable_checkpoints/<step>[.N]   checkpoints that failed their own integrity check, set aside, kept
    RUN_DIR/metrics.jsonl, eval.jsonl, tb/, loss.png   written by train (jaxtx.train.metrics)

Resuming (a rerun of `jaxtx train` into an existing run dir) compares the new resolved config with config.yaml and
refuses, before touching anything, when anything outside RESUME_SAFE differs: those settings define what the
checkpoint's weights, optimizer moments, tokenizer and data-iterator position mean. RESUME_SAFE holds what only
steers the steps still to come:
    train.steps (and with it the lr schedule's length), train.log_every, eval_every, eval_batches, ckpt_every,
    keep_ckpts, async_ckpt, skip_nonfinite, progress, samples, sample_tokens;
    optim.lr, warmup_steps, decay, min_lr_ratio (the lr schedule: AdamW's moments do not depend on it);
    mesh.* (checkpoints are resharded onto the new mesh on restore);
    model.dtype, remat, attention_backend (how the same weights are computed, not what they are).
Not safe, refused: every other model field (shapes, and also architecture with equal shapes: activation, position,
norm, ...), every data field (tokenizer, corpus, split), train.objective/batch_size/seq_len/seed and the objective
knobs, optim.b1/b2/eps/weight_decay/clip_norm/grad_accum (the optimizer the moments were accumulated under).
out_dir, model.preset and model.name are labels and are never compared.

A checkpoint counts as unreadable only when it fails its own integrity check (its metadata or files are missing or
truncated); it is then moved under unreadable_checkpoints/ with a name no other set-aside uses, never deleted. A
checkpoint whose arrays have other shapes or dtypes than the config declares is a config mismatch (ConfigError).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from jaxtx.config import ConfigError, ModelConfig, from_dict

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
LAYOUT = "prompt_layout.json"
LORA_BASE = "lora_base.json"  # a LoRA run: which frozen base its adapters belong to
CHECKPOINTS = "checkpoints"
ASIDE = "unreadable_checkpoints"

RESUME_SAFE = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
    "train.keep_ckpts", "train.async_ckpt", "train.skip_nonfinite", "train.progress", "train.samples",
    "train.sample_tokens",
    "optim.lr", "optim.warmup_steps", "optim.decay", "optim.min_lr_ratio",
    "mesh.*",
    "model.dtype", "model.remat", "model.attention_backend",
})
LABELS = frozenset({"out_dir", "model.preset", "model.name"})


# ------------------------------------------------------------------------------------------------ prompt layout
@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """The ids around a user's prompt, as the model saw them in training (or as its HF tokenizer adds them)."""

    prefix: tuple[int, ...] = ()  # ids every training context started with before the user's text (e.g. BOS)
    suffix: tuple[int, ...] = ()  # ids after the prompt (e.g. the T5 encoder's trailing EOS)

    def apply(self, ids) -> list[int]:
        return [*self.prefix, *(int(i) for i in ids), *self.suffix]

    def to_dict(self) -> dict:
        return {"prefix": list(self.prefix), "suffix": list(self.suffix)}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "PromptLayout":
        try:
            return cls(tuple(int(i) for i in d.get("prefix", ())), tuple(int(i) for i in d.get("suffix", ())))
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(f"{where}: expected {{\"prefix\": [ids], \"suffix\": [ids]}}, got {d!r}") from None


def write_prompt_layout(run_dir, layout: PromptLayout) -> None:
    _write_atomic(Path(run_dir) / LAYOUT, json.dumps(layout.to_dict()) + "\n")


def read_prompt_layout(run_dir) -> Optional[PromptLayout]:
    """The recorded layout, or None for a run dir written before layouts were recorded."""
    path = Path(run_dir) / LAYOUT
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return PromptLayout.from_dict(d, str(path))


# ------------------------------------------------------------------------------------------------ config
def _write_atomic(path: Path, text: str) -> None:
    """Write then rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_config(run_dir) -> Optional[dict]:
    """config.yaml as a dict, or None when the folder has none that jaxtx wrote (no mapping with a model section)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    try:
        resolved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return resolved if isinstance(resolved, dict) and isinstance(resolved.get("model"), dict) else None


def write_config(run_dir, resolved: dict) -> None:
    _write_atomic(Path(run_dir) / CONFIG, yaml.safe_dump(resolved, sort_keys=False))


def is_run_dir(path) -> bool:
    """A folder jaxtx can load a model from: config.yaml with a model section and a checkpoints/ folder."""
    path = Path(path)
    return (path / CHECKPOINTS).is_dir() and read_config(path) is not None


def run_config(run_dir) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole resolved run config as a dict)."""
    run_dir = Path(run_dir)
    resolved = read_config(run_dir)
    if resolved is None or not (run_dir / CHECKPOINTS).is_dir():
        raise ConfigError(f"{run_dir}: not a jaxtx run dir (expected config.yaml with a `model:` section and "
                          "checkpoints/)")
    fields = {k: v for k, v in resolved["model"].items() if k != "preset"}
    return from_dict(fields, str(run_dir / CONFIG)), resolved


def _flat(resolved: dict) -> dict:
    out = {}
    for section, values in resolved.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def resume_changes(old: dict, new: dict, defaults: Optional[dict] = None) -> tuple[list, list]:
    """(safe, unsafe) changes between config.yaml (`old`) and this command's resolved config (`new`), each a list of
    (key, old value, new value). A key config.yaml lacks (written by an older jaxtx) counts as its default."""
    o, n, d = _flat(old), _flat(new), _flat(defaults or {})
    safe, unsafe = [], []
    for key, value in n.items():
        if key in LABELS:
            continue
        before = o.get(key, d.get(key, value))
        if before == value:
            continue
        allowed = key in RESUME_SAFE or f"{key.split('.')[0]}.*" in RESUME_SAFE
        (safe if allowed else unsafe).append((key, before, value))
    return safe, unsafe


def check_resume(run_dir, new: dict, defaults: Optional[dict] = None) -> list:
    """Raise ConfigError listing every unsafe change (with both values); return the safe ones."""
    old = read_config(run_dir) or {}
    safe, unsafe = resume_changes(old, new, defaults)
    if unsafe:
        lines = "\n".join(f"  {k}: {a!r} in config.yaml, {b!r} now" for k, a, b in unsafe)
        raise ConfigError(
            f"out_dir={str(run_dir)!r} holds a run with other settings; resuming it with these would mix two runs "
            f"(nothing was changed):\n{lines}\nRerun with the run's own settings to resume it, or pick a new out_dir "
            f"(train.init_from={run_dir} starts a new run from its weights). Settings that may change on resume: "
            f"{', '.join(sorted(RESUME_SAFE))}")
    return safe


def check_out_dir(path) -> str:
    """'new' (absent or an empty folder) or 'run' (a jaxtx run dir); ConfigError for anything else."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"lies below {p}, which is a file"
            raise ConfigError(f"out_dir={str(path)!r}: {where}; expected a folder (new, empty, or a jaxtx run dir)")
    if not path.exists() or not any(path.iterdir()):
        return "new"
    if read_config(path) is None:
        raise ConfigError(f"out_dir={str(path)!r}: the folder is not empty and is not a jaxtx run dir (no config.yaml "
                          "written by jaxtx train); pick a new or empty folder")
    return "run"


# ------------------------------------------------------------------------------------------------ tokenizer
@dataclasses.dataclass(frozen=True)
class TokenizerFile:
    """A tokenizer on disk: sentencepiece (.model) or HF `tokenizers` (tokenizer.json). Ids None = the file's own."""

    path: Path
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None

    @property
    def sentencepiece(self) -> bool:
        return self.path.suffix == ".model"


def tokenizer_file(run_dir, resolved: Optional[dict] = None) -> Optional[TokenizerFile]:
    """The run's tokenizer: data.tokenizer (an external model), the `tokenizer:` section of a converted model, or
    RUN_DIR/tokenizer.model. None when the file is not there."""
    run_dir = Path(run_dir)
    resolved = read_config(run_dir) if resolved is None else resolved
    resolved = resolved or {}
    spec = resolved.get("tokenizer") or {}
    if spec.get("file"):
        t = TokenizerFile(run_dir / spec["file"], spec.get("eos_id"), spec.get("bos_id"), spec.get("pad_id"))
    else:
        t = TokenizerFile(Path((resolved.get("data") or {}).get("tokenizer") or run_dir / TOKENIZER))
    return t if t.path.is_file() else None


def _json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return out if isinstance(out, dict) else {}


def hf_tokenizer_file(hf_dir) -> Optional[TokenizerFile]:
    """An HF folder's tokenizer: tokenizer.model / spiece.model (sentencepiece: Llama, Mistral, T5) first, else
    tokenizer.json with its special ids from generation_config.json / config.json."""
    hf_dir = Path(hf_dir)
    for name in ("tokenizer.model", "spiece.model"):
        if (hf_dir / name).is_file():
            return TokenizerFile(hf_dir / name)
    if not (hf_dir / "tokenizer.json").is_file():
        return None
    conf, gen = _json(hf_dir / "config.json"), _json(hf_dir / "generation_config.json")
    eos = gen.get("eos_token_id", conf.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return TokenizerFile(hf_dir / "tokenizer.json", eos, gen.get("bos_token_id", conf.get("bos_token_id")),
                         conf.get("pad_token_id"))


def _template_layout(post: dict) -> Optional[PromptLayout]:
    """What a tokenizer.json post-processor adds around a single sequence ($A)."""
    if post.get("type") == "Sequence":
        found = [_template_layout(p) for p in post.get("processors") or []]
        return next((f for f in found if f is not None), None)
    if post.get("type") == "TemplateProcessing":
        ids = {k: v.get("ids", []) for k, v in (post.get("special_tokens") or {}).items()}
        prefix, suffix, seen = [], [], False
        for part in post.get("single") or []:
            if "Sequence" in part:
                seen = True
            elif "SpecialToken" in part:
                (suffix if seen else prefix).extend(ids.get(part["SpecialToken"]["id"], []))
        return PromptLayout(tuple(prefix), tuple(suffix))
    if post.get("type") in ("BertProcessing", "RobertaProcessing"):
        return PromptLayout((int(post["cls"][1]),), (int(post["sep"][1]),))
    return None


def hf_prompt_layout(hf_dir) -> PromptLayout:
    """What the HF folder's tokenizer itself adds to a prompt (what transformers' tokenizer(text) returns around the
    text): tokenizer.json's post-processor, else tokenizer_config.json add_bos_token / add_eos_token, else the
    family's default (Llama/Mistral sentencepiece: BOS first; T5: EOS last; GPT-2: nothing). A folder that records
    its layout (prompt_layout.json: `jaxtx quantize --run` of a training run) keeps the layout it was trained with."""
    hf_dir = Path(hf_dir)
    recorded = read_prompt_layout(hf_dir)
    if recorded is not None:
        return recorded
    tj = _json(hf_dir / "tokenizer.json") if (hf_dir / "tokenizer.json").is_file() else {}
    if isinstance(tj.get("post_processor"), dict):
        found = _template_layout(tj["post_processor"])
        if found is not None:
            return found
    conf, tc = _json(hf_dir / "config.json"), _json(hf_dir / "tokenizer_config.json")
    tok = hf_tokenizer_file(hf_dir)
    bos, eos = conf.get("bos_token_id"), conf.get("eos_token_id")
    if tok is not None and tok.sentencepiece:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(tok.path))
        bos, eos = sp.bos_id(), sp.eos_id()
    eos = eos[0] if isinstance(eos, list) and eos else eos
    mt = conf.get("model_type")
    add_bos = tc.get("add_bos_token", mt in ("llama", "mistral", "mixtral"))
    add_eos = tc.get("add_eos_token", mt == "t5")
    ok = lambda i: isinstance(i, int) and i >= 0  # noqa: E731
    return PromptLayout((bos,) if add_bos and ok(bos) else (), (eos,) if add_eos and ok(eos) else ())


# ------------------------------------------------------------------------------------------------ checkpoints
class CheckpointDamaged(Exception):
    """A checkpoint failed its own integrity check: metadata or array files missing, truncated or garbled."""


def checkpoint_steps(run_dir_or_ckpts) -> list[int]:
    """Finished steps in RUN_DIR/checkpoints (or in a checkpoints folder given directly)."""
    p = Path(run_dir_or_ckpts)
    ckpt = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    if not ckpt.is_dir():
        return []
    return sorted(int(c.name) for c in ckpt.iterdir() if c.name.isdigit() and (c / "state").is_dir())


def _leaf_name(path) -> str:
    """'params.layers.attn.q.kernel': a pytree path as orbax names the array (dict keys, indices, attributes)."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return ".".join(parts)


def state_metadata(state_dir) -> dict[str, tuple[tuple, str]]:
    """{array name: (shape, dtype)} as a checkpoint's own metadata records them. CheckpointDamaged if unreadable."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    state_dir = Path(state_dir).absolute()
    # missing or truncated index files first, without orbax: its failed reads print stray asyncio tracebacks
    try:
        info = json.loads((state_dir / "_METADATA").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{state_dir / '_METADATA'}: unreadable ({type(e).__name__}: {e})") from None
    manifest = state_dir / "manifest.ocdbt"
    if isinstance(info, dict) and info.get("use_ocdbt") and (not manifest.is_file() or manifest.stat().st_size == 0):
        raise CheckpointDamaged(f"{manifest}: missing or empty")
    try:
        tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {_leaf_name(p): (tuple(m.shape), np.dtype(m.dtype).name) for p, m in leaves}
    except Exception as e:  # noqa: BLE001 — whatever orbax raises, the files are not a readable checkpoint
        raise CheckpointDamaged(f"{state_dir}: metadata unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def mismatches(abstract, stored: dict, prefix: str = "") -> list[str]:
    """How a checkpoint's arrays differ from what the config declares: one 'name: checkpoint X vs config Y' each."""
    import jax
    import numpy as np
    want = {_leaf_name(p): (tuple(a.shape), np.dtype(a.dtype).name)
            for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    want = {(f"{prefix}.{k}" if prefix else k): v for k, v in want.items()}
    scope = {k: v for k, v in stored.items() if not prefix or k.startswith(prefix + ".")}
    out = [f"{k}: checkpoint {scope[k][0]} {scope[k][1]} vs config {v[0]} {v[1]}"
           for k, v in want.items() if k in scope and scope[k] != v]
    out += [f"{k}: in the config, not in the checkpoint" for k in want if k not in scope]
    out += [f"{k}: in the checkpoint, not in the config" for k in scope if k not in want]
    return sorted(out, key=lambda m: not m.startswith("params."))  # weights first: they name the model setting


def check_params_fit(ckpt_dir, step: int, abstract_params, what: str) -> None:
    """ConfigError unless checkpoints/<step> holds params shaped and typed as `abstract_params` (read from the
    checkpoint's metadata: cheap, no array is loaded)."""
    step_dir = Path(ckpt_dir) / str(step)
    try:
        stored = state_metadata(step_dir / "state")
    except CheckpointDamaged as e:
        raise ConfigError(f"{what}: checkpoint {step_dir} is damaged ({e})") from None
    bad = mismatches(abstract_params, stored, "params")
    if bad:
        raise ConfigError(f"{what}: checkpoint {step_dir} does not fit the model config: {bad[0]}"
                          + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


def restore_params(ckpt_dir, step: int, abstract_params, what: str):
    """Only "params" of checkpoints/<step>/state, restored as `abstract_params` declares (shapes, dtypes and, when
    given, shardings); the optimizer state is not read. The one params-restore recipe (generate, convert,
    train.init_from, DPO reference). A checkpoint shaped otherwise than the config is a ConfigError naming the
    array and both shapes; `what` says whose config (e.g. 'train.init_from=DIR')."""
    import orbax.checkpoint as ocp
    ckpt_dir = Path(ckpt_dir).absolute()
    check_params_fit(ckpt_dir, step, abstract_params, what)
    target = {"params": abstract_params}
    restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    try:
        with ocp.CheckpointManager(ckpt_dir) as mngr:
            return mngr.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{what}: checkpoint {ckpt_dir / str(step)} is damaged ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None


def _lora_run_of(ckpt_dir) -> Optional[Path]:
    """The LoRA run whose checkpoints folder `ckpt_dir` is (its checkpoints hold only adapters), else None."""
    run = Path(ckpt_dir).absolute().parent
    return run if Path(ckpt_dir).name == CHECKPOINTS and (run / LORA_BASE).is_file() else None


def check_init_fit(ckpt_dir, step: int, abstract, what: str) -> None:
    """check_params_fit for the weights a new run starts from (train.init_from): a LoRA run's checkpoints hold only
    adapters, so its model config (the merged weights' shapes and dtypes) is compared instead. Reads no array."""
    import jax
    run = _lora_run_of(ckpt_dir)
    if run is None:
        return check_params_fit(ckpt_dir, step, abstract, what)
    lcfg, _ = run_config(run)
    shapes = lambda t: {jax.tree_util.keystr(p): (tuple(a.shape), str(a.dtype))  # noqa: E731
                        for p, a in jax.tree_util.tree_leaves_with_path(t)}
    got, want = shapes(abstract_params(lcfg)), shapes(abstract)
    bad = [f"{k}: LoRA run {got.get(k, 'absent')} vs config {want.get(k, 'absent')}"
           for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    if bad:
        raise ConfigError(f"{what}: the LoRA run's merged weights (model {lcfg.name}) do not fit the model config: "
                          f"{bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                          + f"; set model.* to that run's ({run / CONFIG})")


def init_params(ckpt_dir, step: int, abstract, what: str):
    """The params a new run starts from (train.init_from, a LoRA run's frozen base): restore_params of
    checkpoints/<step>, or, when these are a LoRA run's checkpoints (adapters only), that run's base with the
    adapter merged in (load_params(merge=True): the function the run trained, as plain weights; its base is checked
    against the recorded fingerprint), placed as `abstract` declares (shardings, when given)."""
    import jax
    run = _lora_run_of(ckpt_dir)
    if run is None:
        return restore_params(ckpt_dir, step, abstract, what)
    check_init_fit(ckpt_dir, step, abstract, what)
    try:
        params = load_params(run, step, merge=True)[1]
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    params = jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract)
    if all(getattr(a, "sharding", None) is not None for a in jax.tree.leaves(abstract)):
        params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))
    return params


def abstract_params(cfg: ModelConfig):
    import flax.linen as nn

    import jaxtx.model
    return nn.unbox(jaxtx.model.abstract_params(jaxtx.model.build(cfg)))


def _step(run_dir: Path, step: Optional[int]) -> int:
    """`step`, or the newest finished checkpoint when None; ConfigError when there is none or not that one."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise ConfigError(f"{run_dir / CHECKPOINTS}: no finished checkpoint (expected <step>/state)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"step {step}: not in {run_dir / CHECKPOINTS} (have {steps})")
    return step


def load_params(run_dir, step: Optional[int] = None, *, merge: bool = False) -> tuple[ModelConfig, dict, int]:
    """(config, params, step) of the newest finished checkpoint (or `step`), restored as the config declares.

    A LoRA run (lora_base.json; its checkpoints hold only the adapters) is loaded onto its recorded base: the base
    is read again (a jaxtx run dir, an HF folder, or the run's random init) and must have the fingerprint the run
    recorded, else ConfigError naming both. The params are then the base as trained on (NF4/int8 for QLoRA) with the
    adapter leaves beside its kernels, applied on the fly (exactly the function training optimized; merging into a
    quantized base would requantize and add error). merge=True gives a plain float tree instead (convert, quantize):
    a QLoRA base is dequantized first, so the merged weights are still the function the adapters were trained with."""
    run_dir = Path(run_dir).absolute()
    cfg, resolved = run_config(run_dir)
    step = _step(run_dir, step)
    if (run_dir / LORA_BASE).is_file():  # written by jaxtx.train's LoRA runs (train/lora_run.py)
        return cfg, _load_lora_run(run_dir, cfg, resolved, step, merge), step
    params = restore_params(run_dir / CHECKPOINTS, step, abstract_params(cfg), f"{run_dir / CONFIG}")
    return cfg, params, step


# ------------------------------------------------------------------------------------------------ LoRA runs
FINGERPRINT_VERSION = 2


def base_fingerprint(params: dict, version: int = FINGERPRINT_VERSION) -> str:
    """sha256 over every leaf's path, shape and dtype and a hash of its bits, computed where the shards are (a
    sharded 8B base is never gathered). Version 2 hashes the bits with uint32 arithmetic, whose sums are exact in
    any order: the same base gives the same fingerprint on any mesh or device count. Version 1 (lora_base.json
    files without "fingerprint_version") rounded float32 moments, whose last digits follow the reduction order."""
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    def mix(x):  # murmur3's 32-bit finalizer: every input bit reaches every output bit
        x = x ^ (x >> 16)
        x = x * jnp.uint32(0x85EBCA6B)
        x = x ^ (x >> 13)
        x = x * jnp.uint32(0xC2B2AE35)
        return x ^ (x >> 16)

    @jax.jit
    def bits_hash(x):
        if x.dtype.itemsize == 2:
            b = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        elif x.dtype.itemsize == 4:
            b = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
        pos = jnp.zeros(x.shape, jnp.uint32)
        for d in range(x.ndim):  # the element's position, without a flat index that could pass 2**32
            pos = pos * jnp.uint32(0x9E3779B1) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
        return jnp.stack([jnp.sum(mix(b ^ mix(pos + jnp.uint32((k * 0x632BE5AB) & 0xFFFFFFFF))), dtype=jnp.uint32)
                          for k in range(4)])

    @jax.jit
    def moments(x):
        x = x.astype(jnp.float32).reshape(-1)
        w = jnp.cos(jnp.arange(x.shape[0], dtype=jnp.float32) * 0.61803)
        return jnp.stack([x.sum(), (x * x).sum(), (x * w).sum()])
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{leaf.dtype}".encode())
        if version == 1:
            h.update(np.round(np.asarray(jax.device_get(moments(leaf)), np.float64), 4).tobytes())
        else:
            h.update(np.asarray(jax.device_get(bits_hash(leaf)), np.uint32).tobytes())
    return h.hexdigest()


def lora_base_record(run_dir) -> Optional[dict]:
    """lora_base.json of a LoRA run (None for any other run dir): which base its adapters belong to.
    {"source": text, "kind": "jaxtx" | "hf" | "init", "path", "step" (jaxtx), "seed" (init), "fingerprint",
    "fingerprint_version"}; files written before kind/path were recorded hold only source and fingerprint."""
    f = Path(run_dir) / LORA_BASE
    return _json(f) if f.is_file() else None


def _lora_config(resolved: dict, where: str):
    from jaxtx.lora import LoraConfig
    section = resolved.get("lora")
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: a LoRA run ({LORA_BASE}) without a `lora:` section; expected the section "
                          "jaxtx train wrote")
    fields = {k: v for k, v in section.items() if not (k == "quantize" and v is None)}
    try:
        return LoraConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"{where}: lora section: {e}") from None


def _load_base(run_dir: Path, cfg: ModelConfig, resolved: dict, rec: dict) -> dict:
    """The recorded base, as the LoRA run loaded it (train/lora_run.load_base), before any quantization."""
    import jax
    source = rec.get("source", "?")
    kind = rec.get("kind") or ("init" if str(source).startswith("random init") else None)
    missing = lambda why: ConfigError(  # noqa: E731
        f"{run_dir}: a LoRA run whose adapters were trained on the base {source!r} (fingerprint "
        f"{rec.get('fingerprint')}), which {why}; restore that base at its path (nothing was loaded)")
    if kind == "init":  # the base was the run's own random init: rebuilt from train.seed
        import flax.linen as nn

        import jaxtx.model
        seed = rec.get("seed", (resolved.get("train") or {}).get("seed", 0))
        model = jaxtx.model.build(cfg)
        args = jaxtx.model.dummy_inputs(cfg)
        kw = {"method": "masked_lm"} if cfg.kind == "encoder" and cfg.mlm_head else {}
        return jax.jit(lambda r: nn.unbox(model.init(r, *args, **kw)["params"]))(jax.random.key(int(seed)))
    path = Path(rec.get("path") or source)
    if not path.is_dir():
        raise missing("is not there any more")
    if (path / "config.json").is_file() and any(path.glob("model*.safetensors")):  # a Hugging Face folder
        import jaxtx.hf as hf
        try:
            _, params = hf.load(path, dtype=cfg.param_dtype, scan_layers=cfg.scan_layers)
        except Exception as e:  # noqa: BLE001 — whatever the folder holds now, it is not the base
            raise missing(f"no longer loads ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return params
    ckpts = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    steps = checkpoint_steps(ckpts)
    base_step = rec.get("step", steps[-1] if steps else None)
    if base_step not in steps:
        raise missing(f"has no checkpoint {base_step} (has {steps})")
    try:
        return init_params(ckpts, base_step, abstract_params(cfg), f"the LoRA base {path}")
    except ConfigError as e:
        raise missing(f"no longer fits this run ({e})") from None


def _adapters(run_dir: Path, cfg: ModelConfig, lcfg, step: int) -> dict:
    """The checkpoint's lora_a/lora_b with the fixed lora_scale/lora_dropout leaves: their shapes and the fixed
    leaves come from the run's lora section, as in training (the checkpoint holds only the trainable ones)."""
    import jax

    from jaxtx import lora
    from jaxtx.layers.common import dtype_of
    trainable, fixed = lora.split(lora.init_adapters(cfg, lcfg, jax.random.key(0), dtype_of(cfg.param_dtype)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainable)
    return lora.combine(restore_params(run_dir / CHECKPOINTS, step, target, f"{run_dir / CONFIG} (LoRA adapters)"),
                        fixed)


def lora_run_adapters(run_dir, step: Optional[int] = None) -> tuple[ModelConfig, dict, dict]:
    """(config, adapters, lora_base.json record) of a LoRA run, without loading its base: the adapter leaves of the
    newest (or `step`) checkpoint in the run's layout (scanned or not) and param dtype, for a caller that puts them
    over a base it already holds (`jaxtx serve --lora NAME=RUN_DIR`), which must check that base against
    record["fingerprint"] (base_fingerprint with record["fingerprint_version"]). ConfigError for any other folder."""
    run_dir = Path(run_dir).absolute()
    cfg, resolved = run_config(run_dir)
    rec = lora_base_record(run_dir)
    if rec is None:
        raise ConfigError(f"{run_dir}: not a LoRA run (no {LORA_BASE}); expected a run trained with a `lora:` section")
    step = _step(run_dir, step)
    return cfg, _adapters(run_dir, cfg, _lora_config(resolved, str(run_dir / CONFIG)), step), rec


def _load_lora_run(run_dir: Path, cfg: ModelConfig, resolved: dict, step: int, merge: bool) -> dict:
    import jax

    from jaxtx import lora, quant
    from jaxtx.layers.common import dtype_of
    rec = lora_base_record(run_dir) or {}
    base = _load_base(run_dir, cfg, resolved, rec)
    lcfg = _lora_config(resolved, str(run_dir / CONFIG))
    version = int(rec.get("fingerprint_version", 1))
    now = base_fingerprint(base, version)
    if now != rec.get("fingerprint"):
        raise ConfigError(f"{run_dir}: a LoRA run trained on the base {rec.get('source', '?')!r} with fingerprint "
                          f"{rec.get('fingerprint')}; that base now has fingerprint {now}: it changed since the run, "
                          "so the adapters would be applied to other weights (nothing was loaded)")
    adapters = _adapters(run_dir, cfg, lcfg, step)
    if lcfg.quantize:  # QLoRA: the base as the adapters saw it
        from jaxtx.lora.qlora import quantize_base
        base = jax.jit(lambda p: quantize_base(p, lcfg.quantize))(base)
        if merge:
            base = jax.tree.map(lambda x: quant.dequantize(x, dtype_of(cfg.param_dtype)) if quant.is_quantized(x)
                                else x, base, is_leaf=quant.is_quantized)
    params = lora.combine(base, adapters)
    if merge:
        import jaxtx.model
        params = lora.merge(jaxtx.model.build(cfg), params)
    return params


def set_aside(run_dir, step: int) -> Path:
    """Move checkpoints/<step> to unreadable_checkpoints/<step> (or <step>.N: a name no earlier set-aside has), out
    of the manager's folder so the step can be saved again. Nothing is deleted."""
    run_dir = Path(run_dir)
    aside_root = run_dir / ASIDE
    aside_root.mkdir(exist_ok=True)
    aside, n = aside_root / str(step), 0
    while aside.exists():
        n += 1
        aside = aside_root / f"{step}.{n}"
    shutil.move(str(run_dir / CHECKPOINTS / str(step)), str(aside))
    return aside


# ------------------------------------------------------------------------------------------------ converted models
HF_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "generation_config.json")


def write_model(path, cfg: ModelConfig, params, *, hf_dir=None, layout: Optional[PromptLayout] = None) -> None:
    """A run dir holding one model and no training state (`jaxtx convert --from-hf`): config.yaml with the model
    section, checkpoints/0/state = {"params"}, the HF folder's tokenizer files and the prompt layout its tokenizer
    applies. `jaxtx generate --run PATH` and `--from-jaxtx PATH` read it like a training run. PATH must be new or
    empty (convert decides about overwriting)."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{path}: exists and is not an empty folder; refusing to write a model into it")
    path.mkdir(parents=True, exist_ok=True)
    resolved: dict = {"model": {"preset": cfg.name, **cfg.to_dict()}}
    if hf_dir is not None:
        hf_dir = Path(hf_dir)
        for name in HF_TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, path / name)
        tok = hf_tokenizer_file(hf_dir)
        if tok is not None:
            resolved["tokenizer"] = {"file": tok.path.name, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
                                     "pad_id": tok.pad_id}
        resolved["converted_from"] = str(hf_dir.absolute())
        layout = hf_prompt_layout(hf_dir) if layout is None else layout
    write_prompt_layout(path, layout or PromptLayout())
    with ocp.CheckpointManager(path / CHECKPOINTS) as mngr:
        mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
        mngr.wait_until_finished()
    write_config(path, resolved)  # last: a folder without it is not taken for a finished model
