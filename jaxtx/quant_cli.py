"""Quantized model folders and `jaxtx quantize`.

A folder is what `jaxtx.hf.load`, `jaxtx generate --hf` and `jaxtx serve` read unchanged:
    config.json          the HF config of the source (or one derived from the jaxtx config), so tools see a model
    quantization.json    {"format": "jaxtx-quantized", "version": 1, "scheme", "options", "skip", "scan_layers",
                          "model": jaxtx ModelConfig, "tensors": {param path: {scheme, shape, contract, group_size,
                          dtype, compute}}}
    model.safetensors    jaxtx param paths ("layers/attn/q/kernel"); a QTensor as "<path>.values", ".scales" and, where
                         present, ".zeros", ".scale_scales", ".scale_offset" (arrays bit for bit, layers stacked)
    tokenizer files      copied from the source
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from jaxtx import quant

FORMAT, VERSION = "jaxtx-quantized", 1
_PARTS = ("values", "scales", "zeros", "scale_scales", "scale_offset")
_META = ("scheme", "shape", "contract", "group_size", "dtype", "compute")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json")


class QuantizedFolderError(ValueError):
    """A quantized folder that is incomplete or inconsistent; the message names the file and entry."""


def is_quantized_folder(path) -> bool:
    return (Path(path) / "quantization.json").is_file()


def save(path, cfg, qparams, *, options: dict | None = None, skip=quant.DEFAULT_SKIP, hf_config: dict | None = None,
         tokenizer_from=None) -> None:
    """Write a quantized folder (see module doc). `path` must be new or empty."""
    from jaxtx.hf.safetensors_io import write

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise QuantizedFolderError(f"--to {path}: exists and is not an empty folder; choose a new folder")
    tensors, metas = {}, {}
    flat = _flatten(qparams)
    for name, x in flat.items():
        if isinstance(x, quant.QTensor):
            metas[name] = {k: list(v) if isinstance(v, tuple) else v for k in _META for v in [getattr(x, k)]}
            for part in _PARTS:
                if getattr(x, part) is not None:
                    tensors[f"{name}.{part}"] = np.asarray(getattr(x, part))
        else:
            tensors[name] = np.asarray(x)
    if not metas:
        raise QuantizedFolderError("save: no quantized tensor in the params; run quant.quantize_params first")
    path.mkdir(parents=True, exist_ok=True)
    if hf_config is None:
        try:
            from jaxtx.hf import config_to_hf
            hf_config = config_to_hf(cfg, torch_dtype=cfg.param_dtype)
        except Exception:  # a family HF does not have: the folder is still a jaxtx one
            hf_config = {"architectures": ["jaxtx"], "jaxtx_name": cfg.name}
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    write(path / "model.safetensors", tensors, {"format": FORMAT})
    spec = {"format": FORMAT, "version": VERSION, "scheme": next(iter(metas.values()))["scheme"],
            "options": options or {}, "skip": list(skip), "scan_layers": "layers" in qparams,
            "model": cfg.to_dict(), "tensors": metas}
    (path / "quantization.json").write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")
    if tokenizer_from is not None:
        for f in tokenizer_from if isinstance(tokenizer_from, (list, tuple)) else [tokenizer_from]:
            f = Path(f)
            for src in ([f / n for n in _TOKENIZER_FILES] if f.is_dir() else [f]):
                if src.is_file() and src.name != "config.json":
                    shutil.copy2(src, path / src.name)


def _flatten(params, prefix="") -> dict:
    out = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def load(path, *, dtype=None, scan_layers: bool = True):
    """(model, params) of a quantized folder. The quantized arrays come back bit for bit; plain params (norms,
    embeddings, …) and the compute dtype are cast to `dtype` if given. Layers stacked or unrolled as asked."""
    import jax.numpy as jnp

    import jaxtx.model
    from jaxtx.config import from_dict
    from jaxtx.hf.safetensors_io import TensorFile

    path = Path(path)
    qfile = path / "quantization.json"
    try:
        spec = json.loads(qfile.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuantizedFolderError(f"{qfile}: cannot read it as JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise QuantizedFolderError(f"{qfile}: expected format {FORMAT!r} version {VERSION}, got "
                                   f"{spec.get('format') if isinstance(spec, dict) else spec!r}")
    for key in ("model", "tensors", "scan_layers"):
        if key not in spec:
            raise QuantizedFolderError(f"{qfile}: field {key!r} missing")
    cfg = from_dict(spec["model"], str(qfile))
    if not (path / "model.safetensors").is_file():
        raise QuantizedFolderError(f"{path}: no model.safetensors next to quantization.json")
    tf = TensorFile(path / "model.safetensors")
    names = set(tf.meta)
    tree: dict = {}

    def put(name, value):
        d = tree
        keys = name.split("/")
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value

    used = set()
    for name, meta in spec["tensors"].items():
        if not isinstance(meta, dict) or any(k not in meta for k in _META):
            raise QuantizedFolderError(f"{qfile}: tensors[{name!r}] must have the fields {list(_META)}")
        if meta["scheme"] not in quant.SCHEMES:
            raise QuantizedFolderError(f"{qfile}: tensors[{name!r}].scheme={meta['scheme']!r}: expected one of "
                                       f"{quant.SCHEMES}")
        parts = {p: jnp.asarray(np.array(tf.get(f"{name}.{p}"))) for p in _PARTS if f"{name}.{p}" in names}
        if "values" not in parts or "scales" not in parts:
            raise QuantizedFolderError(f"{path / 'model.safetensors'}: {name}.values / {name}.scales missing")
        used |= {f"{name}.{p}" for p in parts}
        put(name, quant.QTensor(**parts, **{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in meta.items() if k in _META}))
    for name in sorted(names - used):
        a = np.array(tf.get(name))
        put(name, jnp.asarray(a if dtype is None or not np.issubdtype(a.dtype, np.floating) else
                              a.astype(jnp.dtype(dtype))))
    if dtype is not None:
        name = np.dtype(jnp.dtype(dtype)).name
        cfg = cfg.replace(dtype=name, param_dtype=name)
    if spec["scan_layers"] and not scan_layers:
        tree = jaxtx.model.unstack_layers(tree)
    elif scan_layers and not spec["scan_layers"]:
        tree = jaxtx.model.stack_layers(tree)
    cfg = cfg.replace(scan_layers=scan_layers)
    model = jaxtx.model.build(cfg)
    _check(model, tree, path)
    return model, tree


def _check(model, tree, path) -> None:
    """Every model param is present with the model's shape (a QTensor: its dequantized shape)."""
    import flax.linen as nn
    import jax

    import jaxtx.model
    want = {quant._path_str(p): tuple(s.shape) for p, s in
            jax.tree_util.tree_leaves_with_path(nn.unbox(jaxtx.model.abstract_params(model)))}
    got = {quant._path_str(p): (x.batch_shape + x.shape if isinstance(x, quant.QTensor) else tuple(np.shape(x)))
           for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda v: isinstance(v, quant.QTensor))}
    bad = [f"{k}: model expects {want[k]}, file has {got.get(k)}" for k in want if got.get(k) != want[k]]
    bad += [f"{k}: not a model param" for k in got if k not in want]
    if bad:
        raise QuantizedFolderError(f"{path}: params do not match the model in quantization.json:\n"
                                   + "\n".join(f"  {b}" for b in bad[:50]))


# ------------------------------------------------------------------------------------------------ CLI
def add_args(p) -> None:
    from jaxtx.argtypes import integer

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="jaxtx run dir or converted model (its newest checkpoint)")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face directory (config.json + *.safetensors)")
    p.add_argument("--scheme", required=True, choices=quant.SCHEMES, help="weight format")
    p.add_argument("--group-size", type=integer(minimum=2), default=None,
                   help="int4: inputs per scale (default 128); nf4: block size (default 64)")
    p.add_argument("--double-quant", action="store_true", help="nf4: store the absmax values as int8 (blocks of 256)")
    p.add_argument("--w8a8", action="store_true", help="int8: compute with int8 x int8 dots (per-token scales)")
    p.add_argument("--skip", action="append", default=None, metavar="REGEX",
                   help="param paths to keep in high precision (repeatable; replaces the default: "
                        f"{' '.join(quant.DEFAULT_SKIP)})")
    p.add_argument("--to", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --to that holds a model (deleted only after the new folder is complete)")
    p.set_defaults(func=main)


def main(args) -> int:
    from jaxtx import hf, run_dir
    from jaxtx.hf import convert

    # The same guarantees as `jaxtx convert` (issue 10): never into its source, a non-empty --to only with --force,
    # written into a hidden sibling and swapped in, so a failure leaves the old folder or the new one, never a mixture.
    src_flag = "--run" if args.run else "--hf"
    src, out = convert.check_paths(args.run or args.hf, args.to, src_flag, force=args.force)
    layout = None
    if args.hf:
        model, params = hf.load(src)
        cfg, tok, hf_cfg = model.cfg, src, json.loads((src / "config.json").read_text())
    else:
        cfg, params = hf.load_jaxtx(src)
        t = run_dir.tokenizer_file(src) if run_dir.is_run_dir(src) else None
        tok, hf_cfg = ([t.path] if t else None), None
        layout = run_dir.read_prompt_layout(src)  # prompts keep the layout the run was trained with
    if args.group_size is not None and args.scheme not in quant.GROUPED:
        raise ValueError(f"--group-size {args.group_size}: only for int4 and nf4, not {args.scheme}")
    opts = {"group_size": args.group_size, "double_quant": args.double_quant, "w8a8": args.w8a8}
    skip = tuple(args.skip) if args.skip else quant.DEFAULT_SKIP
    qparams = quant.quantize_params(params, args.scheme, skip=skip, **opts)

    def write(tmp: Path) -> None:
        save(tmp, cfg, qparams, options=opts, skip=skip, hf_config=hf_cfg, tokenizer_from=tok)
        if layout is not None:
            run_dir.write_prompt_layout(tmp, layout)

    convert.write_folder(out, write)
    before, after = quant.weight_bytes(params), quant.weight_bytes(qparams)
    print(f"{out}: {args.scheme}, {len(quant.quantized_paths(qparams))} matrices quantized; weights "
          f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / before:.2f}x)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's weights (int8, int4, fp8, nf4) into a new folder",
                       description="Write safetensors + quantization.json that jaxtx.hf.load, jaxtx generate --hf "
                                   "and jaxtx serve read unchanged. Embeddings, the output head, norms and the MoE "
                                   "router stay in high precision unless --skip says otherwise.")
    add_args(p)
