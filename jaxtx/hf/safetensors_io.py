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


class TensorFile:
    """One .safetensors file: `.meta[name] = (dtype str, shape)`, `.get(name)` a read-only memory-mapped array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.base = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self.meta = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {info['dtype']}, which jaxtx cannot read")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.base + start, shape=(end - start,))
        return raw.view(dtype).reshape(shape)


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
