"""`jaxtx convert`: Hugging Face safetensors <-> jaxtx, without ever losing data.

    jaxtx convert --from-hf HF_DIR --to OUT               # a jaxtx model (what `jaxtx.hf.save_jaxtx` writes)
    jaxtx convert --from-jaxtx DIR --to-hf --to OUT       # a folder transformers' from_pretrained reads

What it guarantees (issue 10, case 5):
- The source is only read. `--to` equal to the source, inside it, or containing it is refused, naming both.
- A non-empty `--to` is refused unless `--force`. Even with `--force`, only a folder that holds a model (an HF folder
  or a jaxtx model) is replaced: a folder of other files, or a training run (it has metrics), is never replaced.
- The new folder is written complete into a hidden temporary sibling `.NAME.jaxtx-new-*` on the same filesystem, then
  moved into place: on Linux one atomic renameat2(RENAME_EXCHANGE) swaps it with the old folder, elsewhere two
  renames. The old folder is deleted only after the new one is in place. A failure while writing removes the
  temporary folder (ours) and leaves `--to` exactly as it was; a hard kill leaves `--to` either old or new, never a
  mixture (plus, at worst, a hidden `.NAME.jaxtx-*` sibling, which only this tool creates).
`jaxtx.hf.save(..., overwrite=True)` and `jaxtx quantize` write through the same checks (`check_target`) and swap
(`write_folder`).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

from jaxtx.hf.config import HFConversionError

_SHOWN = 5  # entries of a refused folder listed in the message


# ------------------------------------------------------------------------------------------------ what a folder is
def folder_kind(path: Path) -> Optional[str]:
    """What a folder holds: "run" (a jaxtx training run dir: config.yaml + checkpoints/), "jaxtx" (config.json of a
    ModelConfig + params/), "hf" (config.json with a model_type, or *.safetensors), or None (none of these)."""
    path = Path(path)
    if not path.is_dir():
        return None
    # By layout alone: a run dir whose config.yaml does not parse is still one, and must not be taken for HF.
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "run"
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        cfg = None
    if isinstance(cfg, dict) and "model_type" in cfg:
        return "hf"
    if (path / "config.json").is_file() and (path / "params").is_dir():
        return "jaxtx"
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        return "hf"
    return None


def is_training_run(path: Path) -> bool:
    """A run dir that `jaxtx train` wrote (it logs metrics), as opposed to one that convert wrote."""
    return folder_kind(path) == "run" and any((Path(path) / f).exists() for f in ("metrics.jsonl", "eval.jsonl"))


def _entries(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", … {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_paths(src, dst, src_flag: str, force: bool) -> tuple[Path, Path]:
    """Refuse, before anything is read or written, every (source, --to) pair that could lose data.
    Returns both paths resolved (symlinks followed, so a link cannot hide that they are the same folder)."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    both = f"--to {dst} and {src_flag} {src}"
    if not s.exists():
        raise HFConversionError(f"{src_flag} {src}: no such folder")
    if not s.is_dir():
        raise HFConversionError(f"{src_flag} {src}: a file, expected a folder")
    if s == d or (d.exists() and os.path.samefile(s, d)):
        raise HFConversionError(f"{both} are the same folder; convert never writes into its source: choose a new "
                                "--to")
    if d.is_relative_to(s):
        raise HFConversionError(f"{both}: the target is inside the source; convert never writes into its source: "
                                "choose a --to outside it")
    if s.is_relative_to(d):
        raise HFConversionError(f"{both}: the source is inside the target; replacing the target would delete the "
                                "source: choose a --to outside it")
    check_target(dst, force)
    return s, d


def check_target(dst, force: bool, *, name: str = "--to", flag: str = "--force", tool: str = "convert") -> Path:
    """Refuse a target folder whose replacement could lose data: the folder holding the current one, a path under a
    file, a non-empty folder without `force`, and even with it a folder that is not a model or is a training run.
    name / flag / tool: how the caller's messages name the target, the override and the writer ("--to", "--force",
    "convert" for the CLI; "path", "overwrite=True", "jaxtx.hf.save" for the Python API). Returns it resolved."""
    d = Path(dst).resolve()
    if Path.cwd().resolve().is_relative_to(d) and d.exists():
        raise HFConversionError(f"{name} {dst} holds the current folder ({Path.cwd()}); replacing it would pull the "
                                f"folder out from under this shell: choose another {name}")
    for parent in [d, *d.parents]:
        if parent.exists() and not parent.is_dir():
            raise HFConversionError(f"{name} {dst}: {parent} is a file, expected a folder (or a path that does not "
                                    "exist yet)")
    if d.is_dir() and any(d.iterdir()):
        if not force:
            raise HFConversionError(f"{name} {dst} is not empty ({_entries(d)}); pass {flag} to replace it (the old "
                                    "folder is deleted only after the new one is complete), or choose a new folder")
        if folder_kind(d) is None:
            raise HFConversionError(f"{name} {dst} holds files that are not a model ({_entries(d)}); {tool} replaces "
                                    f"only a model folder, even with {flag}: choose an empty or new folder")
        if is_training_run(d):
            raise HFConversionError(f"{name} {dst} is a training run (metrics.jsonl); {tool} never replaces a "
                                    f"training run, even with {flag}: choose another folder")
    return d


# ------------------------------------------------------------------------------------------------ atomic replace
def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _make_parents(d: Path) -> list[Path]:
    """mkdir -p d.parent; returns the folders created (deepest last) so a failure can remove exactly those."""
    missing = [p for p in reversed(d.parents) if not p.exists()]
    for p in missing:
        p.mkdir()
    return missing


def write_folder(dst: Path, write: Callable[[Path], None]) -> bool:
    """Run `write(tmp)` on a fresh hidden sibling of `dst`, then put it at `dst` (see the module docstring).
    Returns True when an existing folder was replaced. The caller has checked `dst` (check_paths)."""
    dst = Path(dst)
    created = _make_parents(dst)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.jaxtx-new-{tag}"
    try:
        tmp.mkdir()
        write(tmp)
    except BaseException:  # KeyboardInterrupt too: nothing of ours may stay behind
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
        raise
    if not dst.exists():
        os.rename(tmp, dst)
        return False
    if _exchange(tmp, dst):  # dst is now the new folder, tmp the old one
        old = tmp
    else:
        old = dst.parent / f".{dst.name}.jaxtx-old-{tag}"
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)  # put the old folder back before reporting the failure
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        shutil.rmtree(old)
    except OSError as e:  # the new folder is in place; say what is left rather than fail the conversion
        print(f"jaxtx: warning: could not delete the replaced folder, now at {old}: {e}", file=sys.stderr)
    return True


# ------------------------------------------------------------------------------------------------ CLI
def add_convert_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF directory (config.json + *.safetensors) to read")
    src.add_argument("--from-jaxtx", metavar="DIR",
                     help="jaxtx model directory (as --from-hf writes) or a training run dir (its newest checkpoint)")
    parser.add_argument("--to", required=True, metavar="DIR",
                        help="output directory: new or empty (a non-empty one needs --force); never the source")
    parser.add_argument("--to-hf", action="store_true", help="write an HF directory (with --from-jaxtx)")
    parser.add_argument("--lora", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter over the source model: with "
                        "--merge folded into the written weights, else re-written beside them in --to/adapter/")
    parser.add_argument("--merge", action="store_true", help="with --lora: merge the adapter into the weights")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --to that holds a model (HF or jaxtx; never a training run). The "
                             "old folder is deleted only after the new one is complete")


def _check_source_kind(src: Path, flag: str) -> None:
    kind = folder_kind(src)
    if flag == "--from-jaxtx" and kind == "hf":
        raise HFConversionError(f"--from-jaxtx {src}: a Hugging Face folder (config.json with model_type, "
                                "*.safetensors); read it with --from-hf")
    if flag == "--from-hf" and kind in ("run", "jaxtx"):
        what = "training run dir (config.yaml + checkpoints/)" if kind == "run" else "model (config.json + params/)"
        raise HFConversionError(f"--from-hf {src}: a jaxtx {what}, not a Hugging Face folder; read it with "
                                "--from-jaxtx")


def _lora(model, params, args):
    """(params to write, fn(tmp) writing what goes beside them) for --lora [--merge]."""
    if not getattr(args, "lora", None):
        return params, lambda tmp: None
    from jaxtx import lora
    _, with_adapter = lora.load_peft(model, params, args.lora)
    if args.merge:
        merged, report = lora.merge_report(model, with_adapter)
        if report:
            print(f"merged into a quantized base: requantization error up to {max(report.values()):.3g} of a "
                  "kernel's max |value|", file=sys.stderr)
        return merged, lambda tmp: None
    return params, lambda tmp: lora.save_peft(model, with_adapter, Path(tmp) / "adapter")


def convert_main(args: argparse.Namespace) -> int:
    """`jaxtx convert --from-hf DIR --to DIR` or `jaxtx convert --from-jaxtx DIR --to-hf --to DIR`."""
    from jaxtx import hf  # the package imports this module; hf.save_jaxtx etc. are looked up at call time

    flag, src = ("--from-hf", args.from_hf) if args.from_hf else ("--from-jaxtx", args.from_jaxtx)
    if args.from_hf and args.to_hf:
        raise HFConversionError("--from-hf writes a jaxtx directory; drop --to-hf")
    if args.from_jaxtx and not args.to_hf:
        raise HFConversionError("--from-jaxtx needs --to-hf (the only target format)")
    if getattr(args, "merge", False) and not getattr(args, "lora", None):
        raise HFConversionError("--merge needs --lora ADAPTER_DIR (the adapter to merge)")
    s, d = check_paths(src, args.to, flag, getattr(args, "force", False))
    _check_source_kind(s, flag)
    try:
        if args.from_hf:
            model, params = hf.load(s, scan_layers=True)
            params, add = _lora(model, params, args)
            replaced = write_folder(d, lambda tmp: (hf.save_jaxtx(model.cfg, params, tmp, hf_dir=s), add(tmp)))
            what = f"jaxtx {hf.family_of(model.cfg)} model ({model.cfg.n_layers} layers)"
        else:
            cfg, params = hf.load_jaxtx(s)
            import jaxtx.model
            params, add = _lora(jaxtx.model.build(cfg), params, args)
            replaced = write_folder(d, lambda tmp: (hf.write_files(cfg, params, tmp), add(tmp)))
            what = f"HF {hf.family_of(cfg)} model"
    except OSError as e:  # disk full, read-only, permissions: a one-line message, and the promise that holds
        raise HFConversionError(f"{e.filename or args.to}: {e.strerror or e}; --to {args.to} is unchanged") from e
    print(f"wrote {what} to {args.to}" + (" (replaced the previous folder)" if replaced else ""))
    return 0
