"""Hugging Face PEFT exchange: adapter_config.json + adapter_model.safetensors <-> jaxtx adapter leaves.

PEFT stores, per adapted module, `base_model.model.<HF module name>.lora_A.weight [r, in]` and `.lora_B.weight
[out, r]` (Linear and GPT-2 Conv1D alike), and computes `scaling * B(A(x))` with scaling = lora_alpha / r (use_rslora:
/ sqrt(r)), r and alpha per module from rank_pattern / alpha_pattern. jaxtx keeps a = A.T reshaped to the kernel's
input dims and b = B.T reshaped to its output dims.

Saving writes each module's exact scale as alpha = scale * r (use_rslora false), with rank_pattern / alpha_pattern
entries for modules that differ from the most common (r, alpha). GPT-2's q, k, v adapters become one c_attn adapter:
one shared `a` when the three are equal (as after loading one), else the three side by side with a block-diagonal B
(rank r_q + r_k + r_v), which PEFT computes exactly as jaxtx does.
"""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np

from jaxtx.config import ConfigError
from jaxtx.lora.core import build_adapters, has_lora, sites

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Config keys that change the computation in ways jaxtx does not implement -> refused, naming the key.
_REFUSED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "use_qalora": "QA-LoRA",
            "target_parameters": "LoRA on raw parameters (MoE experts)"}


class PeftError(ConfigError):
    """An adapter folder jaxtx cannot read; the message names the file and the field or tensor at fault."""


def _read_config(path: Path) -> dict:
    f = path / CONFIG
    if not f.is_file():
        raise PeftError(f"{path}: no {CONFIG} (expected a PEFT LoRA adapter folder)")
    try:
        c = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeftError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise PeftError(f"{f}: expected a JSON object")
    if c.get("peft_type", "LORA") != "LORA":
        raise PeftError(f"{f}: peft_type={c.get('peft_type')!r}; only 'LORA' adapters are supported")
    for key, what in _REFUSED.items():
        if c.get(key):
            raise PeftError(f"{f}: {key}={c[key]!r}: {what} is not supported by jaxtx.lora")
    if c.get("bias", "none") != "none":
        raise PeftError(f"{f}: bias={c['bias']!r}: trained biases are not supported (expected 'none')")
    if c.get("modules_to_save"):
        raise PeftError(f"{f}: modules_to_save={c['modules_to_save']!r}: fully trained modules are not supported")
    for key in ("r", "lora_alpha"):
        v = c.get(key, 8)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise PeftError(f"{f}: {key}={v!r}: expected a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(c.get(key) or {}, dict):
            raise PeftError(f"{f}: {key}={c[key]!r}: expected an object {{module name or regex: value}}")
    return c


def _module_of(key: str, file: Path) -> tuple[str, str]:
    """'base_model.model.X.lora_A(.default).weight' -> ('X', 'A')."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    parts = name.split(".")
    if parts[-1] != "weight" or len(parts) < 3:
        raise PeftError(f"{file}: tensor {key!r}: expected <module>.lora_A.weight or <module>.lora_B.weight")
    if parts[-2] not in ("lora_A", "lora_B"):  # an adapter name PEFT did not strip
        parts = parts[:-2] + parts[-1:]
    if parts[-2] not in ("lora_A", "lora_B"):
        raise PeftError(f"{file}: tensor {key!r} is not a LoRA A/B weight (embeddings, DoRA magnitudes and trained "
                        "biases are not supported)")
    return ".".join(parts[:-2]), parts[-2][-1]


def load_peft(model, params: dict, path) -> tuple:
    """(model, params with the adapter in `path` added beside the base kernels). The model is unchanged: an adapter
    is params only. `params` must be the base the adapter was trained on, without an adapter."""
    from jaxtx.hf import mapping
    from jaxtx.hf.config import family_of
    from jaxtx.hf.safetensors_io import TensorFile
    from jaxtx.lora.core import _pattern_value
    path = Path(path)
    c = _read_config(path)
    f = path / WEIGHTS
    if not f.is_file():
        other = "adapter_model.bin (a pickle; save with safe_serialization=True)" if (
            path / "adapter_model.bin").exists() else "nothing"
        raise PeftError(f"{path}: no {WEIGHTS} (found {other})")
    if has_lora(params):
        raise ValueError("load_peft: params already hold a LoRA adapter (merge or strip it first)")
    cfg = model.cfg
    tf = TensorFile(f)
    by_name = {s.name: s for s in sites(cfg)}
    prefix = mapping.PREFIX[family_of(cfg)][0]
    weights: dict[str, dict] = collections.defaultdict(dict)
    for key in tf.meta:
        mod, ab = _module_of(key, f)
        if mod not in by_name and prefix + mod in by_name:  # saved on a headless base model
            mod = prefix + mod
        if mod not in by_name:
            raise PeftError(f"{f}: tensor {key!r}: module {mod!r} is not a linear layer of this {family_of(cfg)} "
                            f"model (e.g. {next(iter(by_name))!r}; embeddings, heads and MoE experts are not "
                            "supported)")
        weights[mod][ab] = np.asarray(tf.get(key), np.float32)
    if not weights:
        raise PeftError(f"{f}: holds no LoRA tensors")
    rank_p, alpha_p = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    per_path = {}
    for mod, w in weights.items():
        site = by_name[mod]
        if set(w) != {"A", "B"}:
            raise PeftError(f"{f}: module {mod!r} has only lora_{next(iter(w))}; expected lora_A and lora_B")
        A, B = w["A"], w["B"]
        n_in, n_out = math.prod(site.in_shape), sum(math.prod(o) for o in site.out_shapes)
        r = A.shape[0]
        if A.shape != (r, n_in) or B.shape != (n_out, r):
            raise PeftError(f"{f}: module {mod!r}: lora_A {A.shape} / lora_B {B.shape}, expected [r, {n_in}] / "
                            f"[{n_out}, r]")
        r_cfg = _pattern_value(rank_p, mod, c.get("r", 8))
        if r_cfg != r:
            raise PeftError(f"{f}: module {mod!r} has rank {r} but {CONFIG} gives r={r_cfg} (r / rank_pattern)")
        alpha = float(_pattern_value(alpha_p, mod, c.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
        a = A.T.reshape(site.in_shape + (r,))
        start = 0
        for p, out_shape in zip(site.paths, site.out_shapes):  # GPT-2 c_attn: B's rows are [q | k | v]
            n = math.prod(out_shape)
            per_path[p] = (a, B[start:start + n].T.reshape((r,) + out_shape), scale)
            start += n
    from jaxtx.layers.common import dtype_of
    from jaxtx.lora.core import combine
    dtype = dtype_of(cfg.param_dtype)
    return model, combine(params, build_adapters(cfg, per_path, dtype))


def _per_module(cfg, params: dict) -> dict[tuple, tuple]:
    """{module path with layer index: (a, b, scale)} as float32 numpy, zero rank columns trimmed, scale-0 skipped."""
    import flax.linen as nn

    from jaxtx.lora.core import adapters
    tree = nn.unbox(adapters(params))
    out = {}

    def trim(a, b):
        keep = np.any(a.reshape(-1, a.shape[-1]) != 0, axis=0) | np.any(b.reshape(b.shape[0], -1) != 0, axis=1)
        return a[..., keep], b[keep]

    def walk(t, prefix, at):  # at: where a stacked layer index goes into the path (None: not stacked)
        if "lora_a" in t:
            a, b, s = (np.asarray(t[n], np.float32) for n in ("lora_a", "lora_b", "lora_scale"))
            if at is None:
                if s != 0:
                    out[prefix] = trim(a, b) + (float(s),)
                return
            for i in range(a.shape[0]):
                if s[i] != 0:
                    out[prefix[:at] + (i,) + prefix[at:]] = trim(a[i], b[i]) + (float(s[i]),)
            return
        for k, v in t.items():
            if not isinstance(v, dict):
                continue
            if k == "layers":
                walk(v, prefix + (k,), len(prefix) + 1)
            elif k.startswith("layers_") and k[7:].isdigit():
                walk(v, prefix + ("layers", int(k[7:])), None)
            else:
                walk(v, prefix + (k,), at)
    walk(tree, (), None)
    return out


def save_peft(model, params: dict, path, *, base_model_name_or_path: str | None = None,
              task_type: str = "CAUSAL_LM", overwrite: bool = False) -> None:
    """Write the adapter in `params` as a PEFT LoRA folder that `PeftModel.from_pretrained(base, path)` loads and
    computes identically. The base kernels are not written. A non-empty `path` is refused unless overwrite=True, and
    even then only an adapter folder (adapter_config.json) is replaced, never a model, a run or other files; the
    folder is written whole into a hidden sibling and swapped in (jaxtx.hf.convert.write_folder)."""
    from jaxtx.hf.convert import write_folder
    from jaxtx.hf.safetensors_io import write
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_peft: path {path} is a file, expected a folder (or a path that does not exist yet)")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"save_peft: path {path} is not empty; pass overwrite=True to replace an adapter "
                             "folder, or choose a new folder")
        if not (path / CONFIG).is_file():
            raise ValueError(f"save_peft: path {path} holds files that are not a PEFT adapter (no {CONFIG}); "
                             "save_peft replaces only an adapter folder, even with overwrite=True")
    cfg = model.cfg
    per = _per_module(cfg, params)
    if not per:
        raise ValueError("save_peft: params hold no LoRA adapter")
    tensors, ranks = {}, {}
    for site in sites(cfg):
        got = [per.pop(p, None) for p in site.paths]
        if all(g is None for g in got):
            continue
        in_n = math.prod(site.in_shape)
        parts = [g if g is not None else (np.zeros(site.in_shape + (0,), np.float32),
                                          np.zeros((0,) + o, np.float32), 0.0)
                 for g, o in zip(got, site.out_shapes)]
        a_flat = [g[0].reshape(in_n, -1) for g in parts]
        # one exported scale s per module; a part with another scale has scale / s folded into its b (1.0 when
        # they agree, so a load -> save round trip is bit-exact)
        s = parts[0][2] if len({g[2] for g in parts if g[1].shape[0]}) == 1 else 1.0
        b_flat = [g[1].reshape(g[1].shape[0], -1) * np.float32(g[2] / s if g[1].shape[0] else 1.0) for g in parts]
        shared = len(parts) > 1 and all(x.shape == a_flat[0].shape and np.array_equal(x, a_flat[0]) for x in a_flat)
        if len(parts) == 1 or shared:
            A, B = a_flat[0], np.concatenate(b_flat, axis=1)
        else:  # block-diagonal: [x a_q | x a_k | x a_v] times diag(b_q, b_k, b_v) = [x a_q b_q | ...]
            A = np.concatenate(a_flat, axis=1)
            B = np.zeros((A.shape[1], sum(b.shape[1] for b in b_flat)), np.float32)
            r0 = c0 = 0
            for b in b_flat:
                B[r0:r0 + b.shape[0], c0:c0 + b.shape[1]] = b
                r0, c0 = r0 + b.shape[0], c0 + b.shape[1]
        r = A.shape[1]
        if r == 0:
            continue
        tensors[f"{PREFIX}{site.name}.lora_A.weight"] = np.ascontiguousarray(A.T)
        tensors[f"{PREFIX}{site.name}.lora_B.weight"] = np.ascontiguousarray(B.T)
        ranks[site.name] = (r, s * r)
    if per:
        raise ValueError(f"save_peft: adapters at {sorted('/'.join(map(str, p)) for p in per)[:3]} match no linear "
                         "module of the model")
    (r0, alpha0), _ = collections.Counter(ranks.values()).most_common(1)[0]
    short = sorted({n.rsplit(".", 1)[-1] for n in ranks})
    covered = {s.name for s in sites(cfg) if s.short in short}
    config = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
              "r": int(r0), "lora_alpha": float(alpha0), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": sites(cfg)[0].conv1d, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "layers_to_transform": None, "init_lora_weights": True,
              "target_modules": short if covered == set(ranks) else sorted(ranks),
              "rank_pattern": {n: int(r) for n, (r, _) in ranks.items() if r != r0},
              "alpha_pattern": {n: float(a) for n, (r, a) in ranks.items() if a != alpha0},
              "inference_mode": True, "revision": None}

    def write_files(d: Path) -> None:
        (d / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write(d / WEIGHTS, tensors, {"format": "pt"})
    write_folder(path, write_files)
