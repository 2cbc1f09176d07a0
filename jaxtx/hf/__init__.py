"""Hugging Face checkpoints <-> jaxtx: Llama, Mistral, Mixtral, GPT-2, BERT, T5 (v1.0 and v1.1 / flan).

    model, params = jaxtx.hf.load("path/to/hf_dir")           # config.json + *.safetensors (sharded too)
    logits = model.apply({"params": params}, ids)
    jaxtx.hf.save(model, params, "out_dir")                   # transformers' from_pretrained reads it (new or
                                                              # empty out_dir; overwrite=True replaces a model)

Only safetensors are read; pickle files (*.bin, *.pt) are never opened. Every problem with a checkpoint (missing,
unexpected, wrongly shaped or typed tensors) is reported by name in one HFConversionError.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from jaxtx.config import ModelConfig
from jaxtx.hf import mapping
from jaxtx.hf.config import SUPPORTED, HFConversionError, config_from_hf, config_to_hf, family_of
from jaxtx.hf.convert import add_convert_args, check_target, convert_main, folder_kind, write_folder
from jaxtx.hf.safetensors_io import SafetensorsError, TensorFile, write

__all__ = ["load", "save", "write_files", "config_from_hf", "config_to_hf", "HFConversionError", "SUPPORTED",
           "convert_main", "add_convert_args", "save_jaxtx", "load_jaxtx"]
_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_LISTED = 100
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype_name(dtype) -> str:
    import jax.numpy as jnp
    try:
        name = np.dtype(jnp.dtype(dtype)).name
    except TypeError:  # jnp.dtype("floaty"): "data type 'floaty' not understood"
        name = None
    if name not in _DTYPES:
        raise HFConversionError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)} (or None to keep the "
                                "checkpoint's dtype)")
    return name


def _read_json(file: Path, what: str):
    """A JSON file's content; a file that is not UTF-8 JSON fails naming the file, line and column."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise HFConversionError(f"{file}: not UTF-8 text (byte {e.start}); expected the {what} as JSON") from None
    except json.JSONDecodeError as e:
        raise HFConversionError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected "
                                f"the {what}") from None


def _open(path: Path) -> dict[str, TensorFile]:
    """tensor name -> the TensorFile holding it, for model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        content = _read_json(index, "shard index")
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise HFConversionError(f"{index}: field 'weight_map' missing or not an object of tensor name -> "
                                    "shard file name")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise HFConversionError(f"{index}: lists shard files that do not exist: {absent}")
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for ext in ("bin", "pt", "pth", "ckpt", "pkl") for p in path.glob(f"*.{ext}"))
        raise HFConversionError(
            f"{path}: no *.safetensors file" + (f"; found {pickles}, which jaxtx never loads (pickle files can run "
                                                "code). Convert once with transformers: AutoModel.from_pretrained(dir)"
                                                ".save_pretrained(out, safe_serialization=True)" if pickles else ""))
    out: dict[str, TensorFile] = {}
    for f in files:
        tf = TensorFile(path / f)
        for name in tf.meta:
            if name in out:
                raise HFConversionError(f"{path}: tensor {name!r} appears in both {out[name].path.name} and {f}")
            out[name] = tf
    return out


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    … and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def _adjust(cfg: ModelConfig, mt: str, names: dict[str, str], get) -> tuple[ModelConfig, set[str], list[str]]:
    """Settle what config.json leaves open from the tensors present: head tying, BERT pooler / MLM head.
    Returns (config, extra tensor names to ignore, problems)."""
    ignore, problems = set(), []
    head, embed = mapping.TIED_HEAD[mt], mapping.EMBED[mt]
    if cfg.tie_embeddings and head in names and embed in names:
        if np.array_equal(get(head), get(embed)):
            ignore.add(head)  # a tied head stored twice (older exports)
        elif mt in ("llama", "mistral", "mixtral", "t5"):
            # transformers unties in this case (both present, different values); so do we
            if cfg.rescale_tied_logits:
                problems.append(f"{head}: differs from {embed}, but scale_decoder_outputs=true; jaxtx rescales only "
                                "a tied head")
            cfg = cfg.replace(tie_embeddings=False, rescale_tied_logits=False)
        else:
            problems.append(f"{head}: differs from {embed}; the jaxtx {mt} model ties its output head")
    if mt == "t5" and not cfg.tie_embeddings and head not in names:
        cfg = cfg.replace(tie_embeddings=True)  # transformers 5 ties a T5 head that the file lacks
    if mt == "bert":
        cfg = cfg.replace(pooler="bert.pooler.dense.weight" in names,
                          mlm_head="cls.predictions.transform.dense.weight" in names)
    return cfg, ignore, problems


def _assemble(flat: dict[tuple, np.ndarray], scan: bool) -> dict:
    """Nested dict from path tuples; a path with a layer index i goes under "layers" (stacked) or "layers_i"."""
    tree: dict = {}
    groups: dict[tuple, dict[int, np.ndarray]] = {}

    def put(path, value):
        d = tree
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = value

    for path, a in flat.items():
        i = next((n for n, p in enumerate(path) if isinstance(p, int)), None)
        if i is None:
            put(path, a)
        elif scan:
            groups.setdefault(path[:i] + path[i + 1:], {})[path[i]] = a
        else:
            put(path[:i - 1] + (f"layers_{path[i]}",) + path[i + 1:], a)
    for path, by_layer in groups.items():
        put(path, np.stack([by_layer[i] for i in range(len(by_layer))]))
    return tree


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    """Inverse of _assemble for either layout."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            if k == "layers":
                for sub, a in _flatten(v).items():
                    for i in range(a.shape[0]):
                        out[prefix + ("layers", i) + sub] = a[i]
            elif k.startswith("layers_") and k[7:].isdigit():
                out.update({prefix + ("layers", int(k[7:])) + sub: a for sub, a in _flatten(v).items()})
            else:
                out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v)
    return out


def _check_against_model(model, tree: dict) -> None:
    """The converted tree must have exactly the model's param paths and shapes (guards the mapping tables)."""
    import flax.linen as nn
    import jax

    import jaxtx.model
    want = {jax.tree_util.keystr(p): (tuple(s.shape), np.dtype(s.dtype).name) for p, s in
            jax.tree_util.tree_leaves_with_path(nn.unbox(jaxtx.model.abstract_params(model)))}
    got = {jax.tree_util.keystr(p): (tuple(a.shape), np.dtype(a.dtype).name) for p, a in
           jax.tree_util.tree_leaves_with_path(tree)}
    bad = [f"{k}: model expects {want[k]}, converted {got[k]}" for k in want if k in got and want[k] != got[k]]
    bad += [f"{k}: model param not produced by the conversion" for k in want if k not in got]
    bad += [f"{k}: converted but not a model param" for k in got if k not in want]
    if bad:
        raise HFConversionError("jaxtx.hf mapping and jaxtx.model disagree (a bug in jaxtx, not in the checkpoint):\n"
                                + "\n".join(f"  {b}" for b in bad))


def load(path, *, dtype=None, scan_layers: bool = True):
    """(model, params) from an HF directory. dtype=None keeps the checkpoint's float dtype (params and compute);
    a dtype casts every param to it. Params are a plain nested dict of jnp arrays in the jaxtx layout.
    A bad directory, config.json or safetensors file raises HFConversionError naming the file (and field/tensor)."""
    target = _dtype_name(dtype) if dtype is not None else None  # a bad dtype fails before any file is read
    path = Path(path)
    if not path.is_dir():
        raise HFConversionError(f"{path}: {'a file' if path.exists() else 'no such folder'}; expected a Hugging "
                                "Face model directory (config.json + *.safetensors)")
    if (path / "quantization.json").is_file():  # written by `jaxtx quantize`: jaxtx layout + quantized tensors
        from jaxtx import quant_cli
        return quant_cli.load(path, dtype=target, scan_layers=scan_layers)
    if folder_kind(path) in ("run", "jaxtx"):
        raise HFConversionError(f"{path}: a jaxtx model or training run dir, not a Hugging Face directory; read it "
                                "with jaxtx.hf.load_jaxtx (CLI: jaxtx convert --from-jaxtx)")
    if not (path / "config.json").exists():
        raise HFConversionError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf_cfg = _read_json(path / "config.json", "model config")
    cfg = config_from_hf(hf_cfg, str(path / "config.json"))
    mt = hf_cfg["model_type"]
    try:
        files = _open(path)
        return _load_tensors(path, cfg, mt, files, target, scan_layers)
    except SafetensorsError as e:  # one exception type for every checkpoint problem
        raise HFConversionError(str(e)) from None


def _load_tensors(path: Path, cfg: ModelConfig, mt: str, files: dict[str, TensorFile], target: str | None,
                  scan_layers: bool):
    """Check every tensor against the config (one error lists all problems), then map them to jaxtx params."""
    import jax
    import jax.numpy as jnp

    import jaxtx.model
    names = mapping.canonical_names(mt, list(files))  # canonical -> name in the file
    get = lambda n: files[names[n]].get(names[n])  # noqa: E731
    cfg, ignore, problems = _adjust(cfg, mt, names, get)

    entries = mapping.spec(cfg)
    used, missing, bad_shape, bad_dtype = set(), [], [], []
    for e in entries:
        for n, shape in zip(e.hf, e.shapes):
            if n not in names:
                missing.append(f"{n} (expected shape {list(shape)})")
                continue
            used.add(n)
            dt, s = files[names[n]].meta[names[n]]
            if s != shape:
                bad_shape.append(f"{n}: shape {list(s)}, expected {list(shape)}")
            if dt not in _FLOATS:
                bad_dtype.append(f"{n}: dtype {dt}, expected a float type ({', '.join(_FLOATS)})")
    unexpected = sorted(names[n] for n in names if n not in used and n not in ignore
                        and not mapping.is_ignored(mt, n))
    if missing or unexpected or bad_shape or bad_dtype or problems:
        parts = [_listing(t, x) for t, x in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                             ("shape mismatches", bad_shape), ("dtype mismatches", bad_dtype),
                                             ("other problems", problems)) if x]
        raise HFConversionError(f"{path}: checkpoint does not match its config.json ({mt}, "
                                f"{cfg.n_layers} layers, D={cfg.d_model}, V={cfg.vocab_size}):\n" + "\n".join(parts))

    stored = Counter(_FLOATS[files[names[n]].meta[names[n]][0]] for n in used).most_common(1)[0][0]
    target = target or stored
    np_target = np.dtype(jnp.dtype(target))
    flat = {}
    for e in entries:
        outs = e.fwd([get(n) for n in e.hf])
        flat.update({p: np.asarray(a, dtype=np_target) for p, a in zip(e.jax, outs)})
    cfg = cfg.replace(dtype=target, param_dtype=target, scan_layers=scan_layers)
    params = jax.tree.map(jnp.asarray, _assemble(flat, scan_layers))
    model = jaxtx.model.build(cfg)
    _check_against_model(model, params)
    return model, params


def save(model_or_config, params: dict, path, *, max_shard_bytes: int | None = None, overwrite: bool = False) -> None:
    """Write config.json + model.safetensors (or shards + index past max_shard_bytes) that transformers loads.
    Params may be stacked ("layers") or unrolled ("layers_i"), boxed or not, with or without {"params": …}.

    `path` must be new or empty; with overwrite=True an existing model folder (HF or jaxtx, never other files or a
    training run) is replaced. Either way the folder is written complete into a hidden sibling and then swapped in
    (`jaxtx convert`'s path, jaxtx/hf/convert.py): a failure or a kill leaves `path` as it was, never half-written."""
    hf_cfg, tensors = _hf_tensors(model_or_config, params)  # params that do not fit fail before any folder is made
    d = check_target(path, overwrite, name="path", flag="overwrite=True", tool="jaxtx.hf.save")
    write_folder(d, lambda tmp: _write_hf(tmp, hf_cfg, tensors, max_shard_bytes))


def write_files(model_or_config, params: dict, folder, *, max_shard_bytes: int | None = None) -> None:
    """`save`'s files written straight into `folder`, an empty folder the caller owns (no checks, no swap): for
    writers that make their own hidden sibling and swap it in themselves (`jaxtx convert --to-hf`)."""
    _write_hf(Path(folder), *_hf_tensors(model_or_config, params), max_shard_bytes)


def _hf_tensors(model_or_config, params: dict) -> tuple[dict, dict]:
    """(HF config.json dict, {HF tensor name: array}), or one HFConversionError listing every param that does not
    fit the config."""
    import flax.linen as nn
    cfg = model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.cfg
    params = nn.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    flat = _flatten(params)
    dtypes = Counter(a.dtype.name for a in flat.values())
    hf_cfg = config_to_hf(cfg, torch_dtype=dtypes.most_common(1)[0][0])
    tensors, missing = {}, []
    for e in mapping.spec(cfg):
        if any(p not in flat for p in e.jax):
            missing += ["/".join(map(str, p)) for p in e.jax if p not in flat]
            continue
        tensors.update(zip(e.hf, e.inv([flat.pop(p) for p in e.jax])))
    if missing or flat:
        raise HFConversionError(
            f"params do not match ModelConfig {cfg.name!r} ({family_of(cfg)}):\n"
            + "\n".join(_listing(t, x) for t, x in (("missing params", missing),
                                                    ("params with no HF tensor", ["/".join(map(str, p)) for p in flat]))
                        if x))
    return hf_cfg, tensors


def _write_hf(path: Path, hf_cfg: dict, tensors: dict, max_shard_bytes: int | None) -> None:
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    meta = {"format": "pt"}
    total = sum(a.nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write(path / "model.safetensors", tensors, meta)
        return
    shards, size = [{}], 0
    for n in sorted(tensors):
        if shards[-1] and size + tensors[n].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][n] = tensors[n]
        size += tensors[n].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(path / fname, shard, meta)
        weight_map.update({n: fname for n in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ jaxtx side + CLI
def save_jaxtx(cfg: ModelConfig, params: dict, path, *, hf_dir=None) -> None:
    """A jaxtx run dir holding this one model (format: jaxtx.run_dir.write_model): `jaxtx generate --run PATH` and
    load_jaxtx read it. With `hf_dir`, the HF folder's tokenizer files are copied and the prompt layout its tokenizer
    applies (BOS first, T5's EOS last, ...) is recorded. PATH must be new or empty."""
    from jaxtx import run_dir
    run_dir.write_model(path, cfg, params, hf_dir=hf_dir)


def load_jaxtx(path) -> tuple[ModelConfig, dict]:
    """Inverse of save_jaxtx: (config, params) restored in the layout and dtype the config declares, from any jaxtx
    run dir (a training run's newest finished checkpoint too). The older convert format (config.json + orbax params/)
    is still read."""
    from jaxtx import run_dir
    from jaxtx.config import ConfigError, from_dict

    path = Path(path).resolve()
    if run_dir.is_run_dir(path):  # a LoRA run: its adapter merged into its base (a plain tree to write or quantize)
        cfg, params, _ = run_dir.load_params(path, merge=True)
        return cfg, params
    if (path / "config.json").is_file() and (path / "params").is_dir():  # written by jaxtx before run dirs
        import orbax.checkpoint as ocp
        cfg = from_dict(json.loads((path / "config.json").read_text()), str(path / "config.json"))
        return cfg, ocp.StandardCheckpointer().restore(path / "params", run_dir.abstract_params(cfg))
    raise ConfigError(f"{path}: not a jaxtx model or run dir (expected config.yaml with a `model:` section and "
                      "checkpoints/)")
