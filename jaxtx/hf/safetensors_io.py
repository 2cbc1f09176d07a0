"""Read and write the safetensors format directly (bfloat16 and float8 included, through ml_dtypes).

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__"},
then the raw little-endian bytes. Reading memory-maps the file; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file; the message names the file and, where one is at fault, the
    tensor."""


# The safetensors spec caps the JSON header at 100 MB; a larger length field means the file is not safetensors (and
# reading it would try to allocate that much).
MAX_HEADER_BYTES = 100_000_000


class TensorFile:
    """One .safetensors file: `.meta[name] = (dtype str, shape)`, `.get(name)` a read-only memory-mapped array.

    The header is checked whole on open (length, JSON, every entry's dtype/shape/offsets against the file size), so a
    truncated or corrupt file fails here with one SafetensorsError, never later inside np.memmap or a reshape."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: {size} bytes, shorter than the 8-byte header length every "
                                   "safetensors file starts with (truncated, or not a safetensors file)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise SafetensorsError(f"{self.path}: header length field says {n} bytes, but the file has "
                                       f"{size - 8} bytes after it (truncated, or not a safetensors file)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SafetensorsError(f"{self.path}: header is not UTF-8 (byte {8 + e.start}); "
                                   "not a safetensors file") from None
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e.msg} at byte {8 + e.pos})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is a JSON {type(header).__name__}, expected an object "
                                   "{tensor name: {dtype, shape, data_offsets}}")
        self.base = 8 + n
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise SafetensorsError(f"{self.path}: __metadata__ is a JSON {type(metadata).__name__}, expected an "
                                   "object of strings")
        self.metadata = metadata
        for name, info in header.items():
            _check_entry(self.path, name, info)
        # A truncated file: name the first tensor (in file order) whose bytes are cut, and how many more are.
        data_bytes = size - self.base
        cut = sorted((v["data_offsets"][0], k) for k, v in header.items() if v["data_offsets"][1] > data_bytes)
        if cut:
            (start, name), more = cut[0], len(cut) - 1
            end = header[name]["data_offsets"][1]
            raise SafetensorsError(
                f"{self.path}: truncated file: tensor {name!r} needs data bytes {start}..{end}, the file holds "
                f"{data_bytes}" + (f" ({more} later tensors are cut too)" if more else ""))
        self.header = header
        self.meta = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {info['dtype']}, which jaxtx cannot read")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.base + start, shape=(end - start,))
        return raw.view(dtype).reshape(shape)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: Path, name: str, info) -> None:
    """One header entry: {"dtype": str, "shape": [int, ...], "data_offsets": [start, end]} inside the data."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SafetensorsError(f"{where}: header entry {str(info)[:80]}, expected "
                               "{\"dtype\": ..., \"shape\": [...], \"data_offsets\": [start, end]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise SafetensorsError(f"{where}: dtype {dtype!r}, expected a string such as \"F32\"")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise SafetensorsError(f"{where}: shape {shape!r}, expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r}, expected [start, end] with 0 <= start <= end")
    start, end = offsets
    if dtype in DTYPES:
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if end - start != want:
            raise SafetensorsError(f"{where}: data_offsets {offsets} hold {end - start} bytes, but dtype {dtype} "
                                   f"shape {shape} needs {want}")


def write(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> numpy array) as one safetensors file, names sorted, data 8-byte aligned."""
    header: dict = {"__metadata__": dict(metadata or {})}
    arrays, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
