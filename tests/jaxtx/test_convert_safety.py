"""`jaxtx convert` never loses data, and every bad HF / safetensors input is one line through the real CLI (issue 10).

Data loss: every original file is checksummed before and after; a refused or crashed conversion must leave each one
byte-identical and nothing of ours (no `.NAME.jaxtx-*` sibling, no half-made --to) behind. Crashes are simulated by
replacing the writer (jaxtx.hf.save / save_jaxtx) with one that writes part of a folder and raises.

Bad inputs: a table of broken folders, each run through `jaxtx.cli.main` (and one through a `jaxtx` subprocess):
exit code 2, no "Traceback", one line, and the file / field / tensor named.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxtx.hf
from jaxtx.cli import main
from jaxtx.hf import convert
from jaxtx.hf.safetensors_io import TensorFile

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "hf"


def checksums(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root, and '<dir>' for every folder (an emptied folder shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `jaxtx ARGV` in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def hf_copy(tmp_path: Path, name: str = "gpt2", to: str | None = None) -> Path:
    d = tmp_path / (to or name)
    shutil.copytree(FIX / name, d)
    return d


@pytest.fixture(scope="module")
def jaxtx_model(tmp_path_factory) -> Path:
    """The gpt2 fixture as the jaxtx model `convert --from-hf` writes (read-only for the tests)."""
    d = tmp_path_factory.mktemp("jx") / "gpt2_jaxtx"
    assert main(["convert", "--from-hf", str(FIX / "gpt2"), "--to", str(d)]) == 0
    return d


def assert_same_params(a: dict, b: dict) -> None:
    import jax
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink"])
def test_convert_never_writes_into_its_source(tmp_path, capsys, where):
    """Before: `--from-hf D --to D` exited 0 and replaced D's HF config.json, so D could no longer be loaded."""
    src = hf_copy(tmp_path, to="model")
    watched = src
    if where == "same":
        to = src
    elif where == "inside":
        to = src / "jaxtx"
    elif where == "contains":  # replacing the parent would delete the source
        watched = tmp_path / "outer"
        watched.mkdir()
        (watched / "notes.txt").write_text("mine")
        src = Path(shutil.move(str(src), watched / "model"))
        to = watched
    else:
        to = tmp_path / "link"
        to.symlink_to(src, target_is_directory=True)
    before, around = checksums(watched), sorted(os.listdir(tmp_path))
    rc, out = cli(capsys, "convert", "--from-hf", src, "--to", to)
    assert checksums(watched) == before, out
    assert sorted(os.listdir(tmp_path)) == around
    assert rc == 2 and "Traceback" not in out, out
    assert str(src) in out and str(to) in out and "source" in out, out  # names both
    # --force does not change that
    assert cli(capsys, "convert", "--from-hf", src, "--to", to, "--force")[0] == 2
    assert checksums(watched) == before


def test_non_empty_target_is_refused_without_force(tmp_path, capsys):
    """Before: convert wrote config.json and replaced params/ of any --to, deleting the user's params/notes.txt."""
    to = tmp_path / "mine"
    (to / "params").mkdir(parents=True)
    (to / "params" / "notes.txt").write_text("my notes")
    (to / "keep.txt").write_text("keep")
    before = checksums(to)
    rc, out = cli(capsys, "convert", "--from-hf", FIX / "gpt2", "--to", to)
    assert checksums(to) == before, out
    assert rc == 2 and "Traceback" not in out and "--force" in out and str(to) in out, out


def test_to_hf_into_an_existing_hf_folder_is_refused_without_force(tmp_path, capsys, jaxtx_model):
    """Before: the llama folder's safetensors were deleted and gpt2 ones written: a mixture of two models."""
    to = hf_copy(tmp_path, "llama")
    before = checksums(to)
    rc, out = cli(capsys, "convert", "--from-jaxtx", jaxtx_model, "--to-hf", "--to", to)
    assert checksums(to) == before, out
    assert rc == 2 and "--force" in out and "Traceback" not in out, out


@pytest.mark.parametrize("kind", ["user files", "training run"])
def test_force_never_replaces_what_is_not_a_converted_model(tmp_path, capsys, kind):
    to = tmp_path / "target"
    to.mkdir()
    if kind == "user files":
        (to / "thesis.tex").write_text("years of work")
        needle = "not a model"
    else:  # a run dir that `jaxtx train` wrote: its history is not ours to delete
        (to / "checkpoints" / "10" / "state").mkdir(parents=True)
        (to / "config.yaml").write_text("model: {}\n")
        (to / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
        needle = "training run"
    before = checksums(to)
    rc, out = cli(capsys, "convert", "--from-hf", FIX / "gpt2", "--to", to, "--force")
    assert rc == 2 and needle in out and "Traceback" not in out, out
    assert checksums(to) == before


def test_force_never_replaces_the_current_folder(tmp_path, capsys, monkeypatch):
    to = hf_copy(tmp_path, "llama", to="out")
    monkeypatch.chdir(to)
    before = checksums(to)
    rc, out = cli(capsys, "convert", "--from-hf", FIX / "gpt2", "--to", ".", "--force")
    assert checksums(to) == before
    assert rc == 2 and "current folder" in out, out


def test_force_replaces_a_model_folder_whole(tmp_path, capsys, jaxtx_model):
    """--force: the llama folder (and its extra tokenizer file) becomes exactly the new gpt2 folder; no leftovers."""
    to = hf_copy(tmp_path, "llama", to="out")
    (to / "tokenizer.json").write_text("{}")
    rc, out = cli(capsys, "convert", "--from-jaxtx", jaxtx_model, "--to-hf", "--to", to, "--force")
    assert rc == 0, out
    assert sorted(os.listdir(to)) == ["config.json", "model.safetensors"]
    assert json.loads((to / "config.json").read_text())["model_type"] == "gpt2"
    assert_same_params(jaxtx.hf.load(to)[1], jaxtx.hf.load(FIX / "gpt2")[1])
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_empty_or_new_target_needs_no_force(tmp_path, capsys, jaxtx_model):
    (tmp_path / "empty").mkdir()
    for to in (tmp_path / "empty", tmp_path / "new" / "nested"):
        rc, out = cli(capsys, "convert", "--from-jaxtx", jaxtx_model, "--to-hf", "--to", to)
        assert rc == 0, out
        assert_same_params(jaxtx.hf.load(to)[1], jaxtx.hf.load(FIX / "gpt2")[1])
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"]


# ------------------------------------------------------------------------------------------------ crashes
def _crashing_writer(exc: BaseException):
    """A writer that gets part of the way (a config and a half file) and then fails."""
    def write(*args, **kwargs):
        path = Path(args[-1])
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text('{"model_type": "gpt2"}')
        (path / "model.safetensors").write_bytes(b"\0" * 5)
        raise exc
    return write


@pytest.mark.parametrize("target", ["existing model + --force", "new folder", "new nested folder"])
@pytest.mark.parametrize("direction", ["to-hf", "from-hf"])
def test_crash_midway_leaves_the_target_as_it_was(tmp_path, capsys, monkeypatch, jaxtx_model, target, direction):
    """Before: the writer wrote straight into --to, so a crash left a half-written folder (or a mixture)."""
    outer = tmp_path / "outer"
    outer.mkdir()
    to = {"new folder": outer / "out", "new nested folder": outer / "a" / "b" / "out"}.get(target)
    to = to or hf_copy(outer, "llama", to="out")
    before, around = checksums(outer), sorted(os.listdir(outer))
    writer = "write_files" if direction == "to-hf" else "save_jaxtx"
    monkeypatch.setattr(jaxtx.hf, writer, _crashing_writer(RuntimeError("simulated crash")))
    src = ["--from-jaxtx", jaxtx_model, "--to-hf"] if direction == "to-hf" else ["--from-hf", FIX / "gpt2"]
    force = ["--force"] if "force" in target else []
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([str(a) for a in ["convert", *src, "--to", to, *force]])
    assert checksums(outer) == before  # old files byte-identical, nothing half-made, no .out.jaxtx-* sibling
    assert sorted(os.listdir(outer)) == around


def test_disk_full_midway_is_one_line_and_leaves_the_target(tmp_path, capsys, monkeypatch, jaxtx_model):
    to = hf_copy(tmp_path, "llama", to="out")
    before = checksums(tmp_path)
    monkeypatch.setattr(jaxtx.hf, "write_files", _crashing_writer(OSError(errno.ENOSPC, "No space left on device")))
    rc, out = cli(capsys, "convert", "--from-jaxtx", jaxtx_model, "--to-hf", "--to", to, "--force")
    assert rc == 2 and "No space left" in out and "unchanged" in out and "Traceback" not in out, out
    assert checksums(tmp_path) == before


def test_failed_swap_puts_the_old_folder_back(tmp_path, capsys, monkeypatch, jaxtx_model):
    """Without an atomic exchange the old folder is renamed aside first; if the new one then cannot be moved in,
    the old one goes back."""
    to = hf_copy(tmp_path, "llama", to="out")
    before = checksums(tmp_path)
    monkeypatch.setattr(convert, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if ".jaxtx-new-" in str(a):
            raise OSError(errno.EIO, "simulated I/O error", str(b))
        return real_rename(a, b)

    monkeypatch.setattr(convert.os, "rename", rename)
    rc, out = cli(capsys, "convert", "--from-jaxtx", jaxtx_model, "--to-hf", "--to", to, "--force")
    assert rc == 2 and "simulated I/O error" in out, out
    assert checksums(tmp_path) == before


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    if not convert._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here; write_folder falls back to two renames")
    assert (b / "x").read_text() == "from a" and not (a / "x").exists()


# ------------------------------------------------------------------------------------------------ bad inputs
def _rewrite_header(path: Path, edit) -> None:
    """Edit the JSON header of a safetensors file, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _edit_config(d: Path, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d):
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)


def _bad_entry(d):
    def edit(h):
        h["transformer.wpe.weight"]["shape"] = [3, 7]
    _rewrite_header(d / "model.safetensors", edit)


def _run_dir(d):
    (d / "checkpoints" / "3" / "state").mkdir(parents=True)
    (d / "config.yaml").write_text("model: {}\n")


def _last_tensor() -> str:  # the one tensor whose data the truncation cut: the last in the file
    tf = TensorFile(FIX / "gpt2" / "model.safetensors")
    return max(tf.header, key=lambda n: tf.header[n]["data_offsets"][1])


# name -> (break the copied gpt2 folder, extra CLI args, what the message must name; "{dir}" is the folder)
BAD = {
    "safetensors truncated": (_truncate, [], ["{dir}/model.safetensors", "truncated", "TENSOR"]),
    "safetensors < 8 bytes": (lambda d: (d / "model.safetensors").write_bytes(b"abc"), [],
                              ["{dir}/model.safetensors", "3 bytes", "8-byte"]),
    "safetensors header length past the end": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}"), [],
        ["{dir}/model.safetensors", "header length", "1000000000000"]),
    "safetensors header not JSON": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"{nope:  " + b"\0" * 16), [],
        ["{dir}/model.safetensors", "not valid JSON"]),
    "safetensors header entry wrong size": (_bad_entry, [],
                                            ["{dir}/model.safetensors", "'transformer.wpe.weight'", "[3, 7]"]),
    "config.json not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "gpt2",\n'), [],
                             ["{dir}/config.json", "not valid JSON", "line 2"]),
    "config.json missing field": (lambda d: _edit_config(d, lambda c: c.pop("n_embd")), [],
                                  ["{dir}/config.json", "'n_embd'", "missing"]),
    "config.json field null": (lambda d: _edit_config(d, lambda c: c.update(n_layer=None)), [],
                               ["{dir}/config.json", "'n_layer'", "missing"]),
    "config.json field wrong type": (lambda d: _edit_config(d, lambda c: c.update(n_head="4")), [],
                                     ["{dir}/config.json", "n_head='4'", "integer"]),
    "config.json no model_type": (lambda d: _edit_config(d, lambda c: c.pop("model_type")), [],
                                  ["{dir}/config.json", "'model_type'", "llama"]),
    "config.json unknown model_type": (lambda d: _edit_config(d, lambda c: c.update(model_type="gptj")), [],
                                       ["{dir}/config.json", "model_type='gptj'", "llama"]),
    "--from-hf given a run dir": (_run_dir, [], ["--from-hf {dir}", "--from-jaxtx"]),
    "--from-hf with --to-hf": (lambda d: None, ["--to-hf"], ["drop --to-hf"]),
    "--from-hf missing folder": (lambda d: shutil.rmtree(d), [], ["{dir}", "no such folder"]),
    "--to below a file": (lambda d: (d.parent / "afile").write_text("x"), ["--to", "AFILE/sub"],
                          ["afile", "is a file"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_through_the_cli(tmp_path, capsys, case):
    breaker, extra, needles = BAD[case]
    d = hf_copy(tmp_path, to="model")
    breaker(d)
    extra = [str(tmp_path / "afile" / "sub") if a == "AFILE/sub" else a for a in extra]
    to = [] if "--to" in extra else ["--to", str(tmp_path / "out")]
    rc, out = cli(capsys, "convert", "--from-hf", d, *to, *extra)
    assert rc == 2, out
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxtx convert: error: "), out
    for n in needles:
        n = _last_tensor() if n == "TENSOR" else n.replace("{dir}", str(d))
        assert n in out, f"{n!r} not in: {out}"
    assert not (tmp_path / "out").exists()  # nothing half-made


def test_from_jaxtx_given_an_hf_folder_points_to_from_hf(tmp_path, capsys):
    rc, out = cli(capsys, "convert", "--from-jaxtx", FIX / "gpt2", "--to-hf", "--to", tmp_path / "out")
    assert rc == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert f"--from-jaxtx {FIX / 'gpt2'}" in out and "read it with --from-hf" in out, out


def test_from_hf_given_a_converted_jaxtx_model_points_to_from_jaxtx(tmp_path, capsys, jaxtx_model):
    rc, out = cli(capsys, "convert", "--from-hf", jaxtx_model, "--to", tmp_path / "out")
    assert rc == 2 and "--from-jaxtx" in out and "Traceback" not in out, out


def test_bad_input_through_a_jaxtx_subprocess(tmp_path):
    """The installed `jaxtx` entry point, end to end: exit 2, one line naming the file and field, no traceback.
    Before: KeyError: 'n_embd' with a traceback, exit 1."""
    d = hf_copy(tmp_path, to="model")
    _edit_config(d, lambda c: c.pop("n_embd"))
    exe = shutil.which("jaxtx")
    cmd = [exe] if exe else [sys.executable, "-m", "jaxtx"]
    p = subprocess.run(cmd + ["convert", "--from-hf", str(d), "--to", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out, out
    assert f"{d}/config.json: missing required field 'n_embd'" in out, out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["floaty", "int32", 3])
def test_load_with_a_bad_dtype_names_it(dtype):
    """Before: TypeError: data type 'floaty' not understood, from deep inside jnp.dtype."""
    with pytest.raises(ValueError, match=rf"dtype={dtype!r}: expected one of float32, bfloat16, float16, float64"):
        jaxtx.hf.load(FIX / "gpt2", dtype=dtype)


# ------------------------------------------------------------------------------------------------ Python API
# jaxtx.hf.save has the CLI's guarantees. Before: it wrote into `path` in place, over whatever was there (a folder of
# other files lost its config.json; a crash midway left a half-written mixture).
@pytest.fixture(scope="module")
def gpt2():
    return jaxtx.hf.load(FIX / "gpt2")


@pytest.mark.parametrize("kind,overwrite,needle", [
    ("model", False, "is not empty"), ("user files", True, "not a model"), ("training run", True, "training run")])
def test_api_save_refuses_and_leaves_the_folder_byte_for_byte(tmp_path, gpt2, kind, overwrite, needle):
    to = hf_copy(tmp_path, "llama", to="out") if kind == "model" else tmp_path / "out"
    if kind == "user files":
        to.mkdir()
        (to / "config.json").write_text('{"mine": 1}')
    elif kind == "training run":
        (to / "checkpoints" / "10").mkdir(parents=True)
        (to / "config.yaml").write_text("model: {}\n")
        (to / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    before = checksums(tmp_path)
    with pytest.raises(jaxtx.hf.HFConversionError, match=f"path {to}.*{needle}") as e:
        jaxtx.hf.save(*gpt2, to, overwrite=overwrite)
    assert "overwrite=True" in str(e.value)
    assert checksums(tmp_path) == before


def test_api_save_overwrite_replaces_a_model_folder_whole(tmp_path, gpt2):
    to = hf_copy(tmp_path, "llama", to="out")
    (to / "tokenizer.json").write_text("{}")
    jaxtx.hf.save(*gpt2, to, overwrite=True)
    assert sorted(os.listdir(to)) == ["config.json", "model.safetensors"]
    assert json.loads((to / "config.json").read_text())["model_type"] == "gpt2"
    assert_same_params(jaxtx.hf.load(to)[1], gpt2[1])
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no hidden sibling left


@pytest.mark.parametrize("target", ["existing model + overwrite", "new folder"])
def test_api_save_crash_midway_leaves_the_target_as_it_was(tmp_path, monkeypatch, gpt2, target):
    to = hf_copy(tmp_path, "llama", to="out") if "existing" in target else tmp_path / "out"
    before = checksums(tmp_path)
    crash = _crashing_writer(RuntimeError("simulated crash"))
    monkeypatch.setattr(jaxtx.hf, "_write_hf", lambda folder, *rest: crash(folder))
    with pytest.raises(RuntimeError, match="simulated crash"):
        jaxtx.hf.save(*gpt2, to, overwrite="existing" in target)
    assert checksums(tmp_path) == before
