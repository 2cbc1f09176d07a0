"""Quantized weights for the one model definition: int8, int4, fp8 and NF4 (+ double quantization).

    qparams = quantize_params(params, "int4", group_size=128)   # embeddings/head/norms/router stay as they were
    logits = model.apply({"params": qparams}, ids)               # the only change; compute dtype stays the model's

A QTensor is a pytree (flax.struct dataclass), so it goes through jit, scan (stacked layers slice every leaf on axis
0), sharding, orbax and safetensors like any param. Dense / LMHead / MoE / Embed read their kernel through
`param()` (jaxtx.layers.common), which hands a QTensor over as is; `einsum` and `materialize` below compute with it.

Layouts (the kernel's own shape `shape`, after any leading batch dims: L stacked layers, E experts):
- per channel (int8, fp8): `values` has the kernel's shape; `scales` too, with 1 on the contraction axes, so the
  scale multiplies the dot's output (the epilogue) instead of the [in, out] kernel.
- group-wise (int4, nf4): the kernel as rows [*batch, O, I] (O = non-contraction axes, I = contraction axes, each
  flattened in order; I zero-padded to a multiple of the group), groups of `group_size` consecutive inputs, two 4-bit
  codes per byte with the first in the high nibble. For a torch Linear weight [out, in] this is exactly
  bitsandbytes' flattened layout, so NF4 bytes and absmax values can be exchanged when I % 64 == 0.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEMES = ("int8", "int4", "fp8", "nf4")
GROUPED = ("int4", "nf4")
# The 16 NormalFloat values of QLoRA as float32, exactly as bitsandbytes has them (csrc/kernels.cu, functional.py).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
FP8_MAX = 448.0  # largest finite float8_e4m3fn; e4m3fn has no inf, so anything past it would become NaN
DQ_BLOCK = 256  # double quantization: absmax values per 8-bit block (QLoRA)
# Which params stay in high precision unless the caller says otherwise (regexes over "a/b/c" param paths):
# embeddings and the output head (a small share of a big model's bytes, but most sensitive), norms and biases
# (1-D), the MoE router (its top-k flips on small errors).
DEFAULT_SKIP = (r"(^|/)(embed|pos_embed|type_embed|rel_bias)/", r"(^|/)lm_head/", r"(^|/)router$")
_MOE_WEIGHTS = ("wi_gate", "wi_up", "wi", "wo")


@struct.dataclass
class QTensor:
    """A quantized kernel. Arrays are pytree leaves; the rest is static (the same for every layer of a stack).

    values: int8 (int8) | float8_e4m3fn (fp8) | uint8 packed codes [*batch, O, I/2] (int4, nf4)
    scales: float32 [*batch, *shape with 1 on contraction axes] (per channel) | [*batch, O, I/group] (grouped);
            nf4 + double_quant: int8 codes of (absmax - offset)
    zeros: int4 zero points, uint8 [*batch, O, I/group]
    scale_scales, scale_offset: nf4 double quant, float32 [*batch, ceil(O*I/group / 256)] and [*batch, 1]
    """

    values: jax.Array
    scales: jax.Array
    zeros: Optional[jax.Array] = None
    scale_scales: Optional[jax.Array] = None
    scale_offset: Optional[jax.Array] = None
    scheme: str = struct.field(pytree_node=False, default="int8")
    shape: tuple = struct.field(pytree_node=False, default=())  # the kernel's shape without batch dims
    contract: tuple = struct.field(pytree_node=False, default=(0,))  # contraction axes of `shape`
    group_size: int = struct.field(pytree_node=False, default=0)  # 0: per channel
    dtype: str = struct.field(pytree_node=False, default="float32")  # the original dtype
    compute: str = struct.field(pytree_node=False, default="dequant")  # or "w8a8" (int8 x int8 dots)

    @property
    def batch_shape(self) -> tuple:
        n = self.values.ndim - (2 if self.scheme in GROUPED else len(self.shape))
        return tuple(self.values.shape[:n])

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self))

    def __repr__(self):
        shape = self.batch_shape + self.shape if hasattr(self.values, "ndim") else self.shape
        return (f"QTensor({self.scheme}, shape={shape}, contract={self.contract}, "
                f"group={self.group_size}, dtype={self.dtype}, compute={self.compute})")


def is_quantized(x) -> bool:
    return isinstance(x, QTensor)


# ------------------------------------------------------------------------------------------------ layout helpers
def _rows_perm(nb: int, shape: tuple, contract: tuple) -> tuple:
    out = [i for i in range(len(shape)) if i not in contract]
    return tuple(range(nb)) + tuple(nb + i for i in out) + tuple(nb + i for i in contract)


def _to_rows(x, nb: int, contract: tuple):
    """[*batch, *shape] -> [*batch, O, I] (output axes first, contraction axes last, each flattened)."""
    shape = x.shape[nb:]
    O = math.prod(s for i, s in enumerate(shape) if i not in contract)
    I = math.prod(shape[i] for i in contract)
    return jnp.transpose(x, _rows_perm(nb, shape, contract)).reshape(x.shape[:nb] + (O, I))


def _from_rows(r, shape: tuple, contract: tuple):
    nb = r.ndim - 2
    out = [shape[i] for i in range(len(shape)) if i not in contract]
    r = r.reshape(r.shape[:nb] + tuple(out) + tuple(shape[i] for i in contract))
    return jnp.transpose(r, np.argsort(_rows_perm(nb, shape, contract)))


def pack4(codes):
    """uint8 codes in [0, 16) [..., 2n] -> bytes [..., n]; the first code of each pair in the high nibble."""
    codes = codes.astype(jnp.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack4(packed):
    """Inverse of pack4: [..., n] uint8 -> [..., 2n] codes."""
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def _grouped(x, nb: int, contract: tuple, g: int):
    """Rows [*batch, O, I] zero-padded to a multiple of g, as groups [*batch, O, I/g, g]."""
    r = _to_rows(x.astype(jnp.float32), nb, contract)
    pad = -r.shape[-1] % g
    if pad:
        r = jnp.pad(r, [(0, 0)] * (r.ndim - 1) + [(0, pad)])
    return r.reshape(r.shape[:-1] + (r.shape[-1] // g, g))


def _safe(s):
    return jnp.where(s > 0, s, 1.0)  # an all-zero channel/group: any scale reproduces it exactly


# ------------------------------------------------------------------------------------------------ quantize
def quantize(x, scheme: str, *, contract=(0,), n_batch: int = 0, group_size: Optional[int] = None,
             double_quant: bool = False, w8a8: bool = False) -> QTensor:
    """Quantize a kernel x [*batch (n_batch dims), *shape]; `contract` are its contraction axes within `shape`.

    int8: symmetric, per output channel (absmax / 127). fp8: e4m3 values, per-channel scale absmax / 448.
    int4: asymmetric per group of `group_size` inputs (default 128; range widened to include 0), zero points in
    [0, 15]. nf4: NormalFloat codes of x / absmax per block of `group_size` (default 64); double_quant=True stores the
    absmax values as int8 in blocks of 256 after subtracting their mean. w8a8=True (int8 only): the model multiplies
    int8 activations (per-token scales) with the int8 values in an int32 dot instead of dequantizing.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: expected one of {', '.join(SCHEMES)}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize: expected a float array, got dtype {x.dtype}")
    shape = tuple(x.shape[n_batch:])
    contract = tuple(sorted(int(c) % max(len(shape), 1) for c in contract))
    if not shape or not contract or len(set(contract)) != len(contract) or len(contract) >= len(shape) + 1:
        raise ValueError(f"quantize: contract={contract} must name distinct axes of the kernel shape {shape}")
    if double_quant and scheme != "nf4":
        raise ValueError(f"double_quant=True: only for scheme 'nf4', got {scheme!r}")
    if w8a8 and scheme != "int8":
        raise ValueError(f"w8a8=True: only for scheme 'int8', got {scheme!r}")
    if group_size is not None and scheme not in GROUPED:
        raise ValueError(f"group_size={group_size}: only int4 and nf4 are group-wise; {scheme} is per channel")
    meta = dict(scheme=scheme, shape=shape, contract=contract, dtype=np.dtype(x.dtype).name,
                compute="w8a8" if w8a8 else "dequant")
    xf = x.astype(jnp.float32)
    if scheme in ("int8", "fp8"):
        axes = tuple(n_batch + c for c in contract)
        amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
        if scheme == "int8":
            s = _safe(amax / 127.0)
            return QTensor(jnp.clip(jnp.round(xf / s), -127, 127).astype(jnp.int8), s, **meta)
        s = _safe(amax / FP8_MAX)
        return QTensor(jnp.clip(xf / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), s, **meta)

    g = (128 if scheme == "int4" else 64) if group_size is None else group_size
    if not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2:
        raise ValueError(f"group_size={g!r}: expected an even int >= 2 (e.g. 32, 64, 128)")
    G = _grouped(xf, n_batch, contract, g)  # [*batch, O, I/g, g]
    if scheme == "int4":
        lo = jnp.minimum(jnp.min(G, axis=-1, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(G, axis=-1, keepdims=True), 0.0)
        s = _safe((hi - lo) / 15.0)
        z = jnp.clip(jnp.round(-lo / s), 0, 15)
        q = jnp.clip(jnp.round(G / s) + z, 0, 15)
        return QTensor(pack4(q.reshape(q.shape[:-2] + (-1,))), s[..., 0], zeros=z[..., 0].astype(jnp.uint8),
                       group_size=g, **meta)
    amax = _safe(jnp.max(jnp.abs(G), axis=-1, keepdims=True))
    code = jnp.asarray(NF4_CODE)
    q = jnp.argmin(jnp.abs((G / amax)[..., None] - code), axis=-1)  # nearest code (ties: the lower one)
    qt = QTensor(pack4(q.reshape(q.shape[:-2] + (-1,))), amax[..., 0], group_size=g, **meta)
    return _double_quant(qt) if double_quant else qt


def _double_quant(qt: QTensor) -> QTensor:
    """absmax [*batch, O, n] -> int8 codes of (absmax - mean), one float32 scale per 256 of them (flattened)."""
    a = qt.scales
    nb = a.ndim - 2
    flat = a.reshape(a.shape[:nb] + (-1,))
    offset = jnp.mean(flat, axis=-1, keepdims=True)
    c = flat - offset
    pad = -c.shape[-1] % DQ_BLOCK
    blocks = jnp.pad(c, [(0, 0)] * nb + [(0, pad)]).reshape(c.shape[:nb] + (-1, DQ_BLOCK))
    s2 = _safe(jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 127.0)
    codes = jnp.clip(jnp.round(blocks / s2), -127, 127).astype(jnp.int8).reshape(c.shape[:nb] + (-1,))
    codes = codes[..., :flat.shape[-1]].reshape(a.shape)
    return qt.replace(scales=codes, scale_scales=s2[..., 0], scale_offset=offset)


def _nf4_absmax(qt: QTensor):
    if qt.scale_scales is None:
        return qt.scales
    a = qt.scales
    nb = a.ndim - 2
    flat = a.reshape(a.shape[:nb] + (-1,)).astype(jnp.float32)
    pad = -flat.shape[-1] % DQ_BLOCK
    blocks = jnp.pad(flat, [(0, 0)] * nb + [(0, pad)]).reshape(flat.shape[:nb] + (-1, DQ_BLOCK))
    out = (blocks * qt.scale_scales[..., None]).reshape(flat.shape[:nb] + (-1,))[..., :flat.shape[-1]]
    return (out + qt.scale_offset).reshape(a.shape)


# ------------------------------------------------------------------------------------------------ dequantize
def dequantize(qt: QTensor, dtype=None):
    """The kernel [*batch, *shape] in `dtype` (default: the dtype it was quantized from)."""
    dt = jnp.dtype(qt.dtype if dtype is None else dtype)
    if qt.scheme in ("int8", "fp8"):
        return (qt.values.astype(jnp.float32) * qt.scales).astype(dt)
    codes = unpack4(qt.values).astype(jnp.int32)  # [*batch, O, I_padded]
    g = qt.group_size
    codes = codes.reshape(codes.shape[:-1] + (-1, g))
    if qt.scheme == "int4":
        r = (codes - qt.zeros[..., None].astype(jnp.int32)).astype(jnp.float32) * qt.scales[..., None]
    else:
        r = jnp.asarray(NF4_CODE)[codes] * _nf4_absmax(qt)[..., None]
    r = r.reshape(r.shape[:-2] + (-1,))
    I = math.prod(qt.shape[i] for i in qt.contract)
    return _from_rows(r[..., :I], qt.shape, qt.contract).astype(dt)


def materialize(w, dtype):
    """A param in `dtype`: dequantized when it is a QTensor (embedding tables, MoE expert stacks)."""
    return dequantize(w, dtype) if isinstance(w, QTensor) else w.astype(dtype)


def take(table, ids, dtype):
    """Rows of an embedding table [V, D] (plain or quantized) in `dtype`. int8/fp8 tables (per-row scales) gather
    values and scales; int4/nf4 tables are dequantized whole first (opt-in only: DEFAULT_SKIP keeps embeddings)."""
    if not isinstance(table, QTensor):
        return jnp.take(table, ids, axis=0).astype(dtype)
    if table.scheme in ("int8", "fp8") and table.contract == (1,) and table.values.ndim == 2:
        rows = jnp.take(table.values, ids, axis=0).astype(jnp.float32) * jnp.take(table.scales, ids, axis=0)
        return rows.astype(dtype)
    return jnp.take(dequantize(table, dtype), ids, axis=0)


def _out_scale(qt: QTensor):
    """Per-channel scales without their contraction axes: they broadcast over the einsum's output dims."""
    nb = qt.values.ndim - len(qt.shape)
    return jnp.squeeze(qt.scales, axis=tuple(nb + c for c in qt.contract))


def einsum(eq: str, x, w, dtype):
    """jnp.einsum(eq, x, w) for a plain or quantized kernel w, in the compute dtype.

    Per-channel schemes multiply the (converted) values and apply the scale to the output, so XLA can fuse the convert
    into the dot's operand and the scale into its epilogue; grouped schemes dequantize first (the scale varies along
    the contraction). eq must contract x's trailing dims with w's contraction axes in order (as Dense does).
    """
    if not isinstance(w, QTensor):
        return jnp.einsum(eq, x.astype(dtype), w.astype(dtype))
    if w.scheme in GROUPED:
        return jnp.einsum(eq, x.astype(dtype), dequantize(w, dtype))
    if w.compute == "w8a8":
        n_in = len(w.contract)
        xf = x.astype(jnp.float32)
        sx = _safe(jnp.max(jnp.abs(xf), axis=tuple(range(x.ndim - n_in, x.ndim)), keepdims=True) / 127.0)
        xq = jnp.clip(jnp.round(xf / sx), -127, 127).astype(jnp.int8)
        one_row = math.prod(x.shape[:x.ndim - n_in]) == 1 and x.ndim > n_in
        if one_row and jax.default_backend() == "cpu":
            # XLA:CPU's int8 dot (YNNPACK) takes a slow path for a single row: 2048x8192 at 160 ms for one row
            # against 10-14 ms for two (f32: 9-13 ms). A zero second row costs nothing.
            y = jnp.einsum(eq, jnp.concatenate([xq, jnp.zeros_like(xq)], 0), w.values,
                           preferred_element_type=jnp.int32)[:1].astype(jnp.float32)
        else:
            y = jnp.einsum(eq, xq, w.values, preferred_element_type=jnp.int32).astype(jnp.float32)
        n_out = len(w.shape) - n_in
        sx = sx.reshape(sx.shape[:x.ndim - n_in] + (1,) * n_out)
        return (y * sx * _out_scale(w)).astype(dtype)
    y = jnp.einsum(eq, x.astype(dtype), w.values.astype(dtype))
    return (y * _out_scale(w).astype(dtype)).astype(dtype)


# ------------------------------------------------------------------------------------------------ params
def kernel_layout(path: tuple, ndim: int) -> Optional[tuple[int, tuple]]:
    """(batch dims, contraction axes) of a jaxtx param by its path, or None if it is not a matrix to quantize.

    attention q/k/v [D, N, Hd] and o [H, Hd, D]; Dense/LMHead kernels [in, out]; MoE experts [E, in, out];
    embedding tables [V, D] (contract D, as the tied head does). A leading "layers" axis (scan) is a batch dim.
    """
    name = path[-1]
    parent = path[-2] if len(path) > 1 else ""
    if name == "kernel":
        kd, contract = (3, (0, 1)) if parent == "o" else (3, (0,)) if parent in ("q", "k", "v") else (2, (0,))
    elif parent == "moe" and name in _MOE_WEIGHTS:
        kd, contract = 2, (0,)
    elif name == "embedding" and parent != "rel_bias":  # T5's bias table is read by index in Stack.t5_bias
        kd, contract = 2, (1,)
    else:
        return None
    nb = ndim - kd
    return (nb, contract) if nb >= 0 else None


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def quantize_params(params, scheme: str, *, skip=DEFAULT_SKIP, group_size: Optional[int] = None,
                    double_quant: bool = False, w8a8: bool = False, min_size: int = 0) -> dict:
    """Every weight matrix of a jaxtx params tree as a QTensor, except paths matching a `skip` regex (default
    DEFAULT_SKIP: embeddings, output head, router; norms and biases are never quantized) and matrices smaller than
    `min_size` elements. Works on stacked (scan) and unrolled layouts. Options as for `quantize`."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: expected one of {', '.join(SCHEMES)}")
    if isinstance(skip, str):
        skip = (skip,)
    try:
        pats = [re.compile(p) for p in skip]
    except re.error as e:
        raise ValueError(f"skip: {e.pattern!r} is not a valid regular expression ({e})") from None
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    found = []

    def one(path, x):
        if isinstance(x, QTensor):
            raise ValueError(f"quantize_params: {_path_str(path)} is already quantized ({x.scheme})")
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        lay = kernel_layout(keys, len(np.shape(x)))  # shapes only: works on tracers (eval_shape in weight_report)
        p = "/".join(keys)
        if lay is None or any(r.search(p) for r in pats) or math.prod(np.shape(x)) < min_size:
            return x
        found.append(p)
        return quantize(x, scheme, contract=lay[1], n_batch=lay[0], group_size=group_size,
                        double_quant=double_quant, w8a8=w8a8)

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda v: isinstance(v, QTensor))
    if not found:
        raise ValueError(f"quantize_params: no weight matrix left to quantize (skip={list(skip)}); expected jaxtx "
                         "params with Dense 'kernel' leaves")
    return out


def quantized_paths(params) -> dict[str, QTensor]:
    """'a/b/kernel' -> QTensor for every quantized leaf."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: isinstance(v, QTensor)):
        if isinstance(x, QTensor):
            out[_path_str(path)] = x
    return out


def weight_bytes(params) -> int:
    """Bytes of every param, quantized ones counted with their scales and zero points."""
    return sum(int(a.size) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))


def parse_scheme(text: str) -> tuple[str, dict]:
    """'int8' | 'fp8' | 'int4' | 'int4-g64' | 'nf4' | 'nf4-dq' (double quant) | 'nf4-g128-dq' -> (scheme, options)."""
    parts = text.lower().replace("+", "-").split("-")
    scheme, opts = parts[0], {}
    for p in parts[1:]:
        if p in ("dq", "double_quant", "doublequant") and scheme == "nf4":
            opts["double_quant"] = True
        elif p[:1] == "g" and p[1:].isdigit() and scheme in GROUPED:
            opts["group_size"] = int(p[1:])
        else:
            scheme = None
    if scheme not in SCHEMES:
        raise ValueError(f"--weights {text!r}: expected int8, fp8, int4[-gN] or nf4[-gN][-dq] (e.g. int4-g128, "
                         "nf4-dq), or a float dtype")
    return scheme, opts


def weight_report(cfg, schemes) -> list[str]:
    """Weight bytes of a config's params per scheme (e.g. ["bfloat16", "int8", "int4-g128", "nf4-dq"]), from the
    abstract param tree: nothing is allocated, the counts are those quantize_params would produce (default skip)."""
    import jaxtx.model
    from jaxtx.sizing import human_bytes

    model = jaxtx.model.build(cfg.replace(scan_layers=True))
    import flax.linen as nn
    abstract = nn.unbox(jaxtx.model.abstract_params(model))
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))
    lines = []
    for name in schemes:
        if name in ("float32", "bfloat16", "float16"):
            nbytes = total * np.dtype(jnp.dtype(name)).itemsize
            label = name
        else:
            scheme, opts = parse_scheme(name)
            half = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract)
            q = jax.eval_shape(lambda p: quantize_params(p, scheme, **opts), half)
            nbytes = weight_bytes(q)
            label = f"{name} (rest bf16)"
        lines.append(f"  {label:<24} {human_bytes(nbytes):>10}  ({nbytes / (2 * total):.3f}x of bf16)")
    return lines


# ------------------------------------------------------------------------------------------------ sharding
def component_axes(qt: QTensor, axes: tuple) -> QTensor:
    """Logical axis names for each array of a QTensor, from the kernel's names `axes` ([*batch, *shape]).

    Scales shard with the kernel: per channel, they keep the kernel's names except on the (size-1) contraction axes;
    grouped, rows [*batch, O, I] take the first output / first contraction axis name (a row-major merge shards like
    its outer axis). Double-quant statistics are tiny and flattened across rows: replicated.
    """
    nb = len(axes) - len(qt.shape)
    batch, names = tuple(axes[:nb]), tuple(axes[nb:])
    if qt.scheme in ("int8", "fp8"):
        s = batch + tuple(None if i in qt.contract else n for i, n in enumerate(names))
        return qt.replace(values=batch + names, scales=s)
    out_n = next((n for i, n in enumerate(names) if i not in qt.contract), None)
    in_n = names[qt.contract[0]]
    rows = batch + (out_n, in_n)
    return qt.replace(values=rows, scales=rows, zeros=None if qt.zeros is None else rows,
                      scale_scales=None if qt.scale_scales is None else batch + (None,),
                      scale_offset=None if qt.scale_offset is None else batch + (None,))


def shardings(model, qparams, mesh, rules):
    """NamedShardings for quantized params (plain params as jaxtx.sharding.param_shardings gives them). A dim that
    its mesh axes do not divide (a group count, a packed half) is replicated instead of failing."""
    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtx import sharding as shd
    from jaxtx.model import dummy_inputs

    boxed = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model.cfg)), jax.random.key(0))["params"]
    names = {_path_str(p): tuple(b.names) for p, b in
             jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
             if isinstance(b, nn.Partitioned)}
    table = dict((n, shd._as_tuple(a)) for n, a in reversed(rules))

    def spec(axn, shape):
        out, used = [], set()
        for n, size in zip(axn, shape):
            mesh_axes = tuple(a for a in table.get(n, ()) if a in mesh.shape and mesh.shape[a] > 1) if n else ()
            if not mesh_axes or used & set(mesh_axes) or size % math.prod(mesh.shape[a] for a in mesh_axes):
                out.append(None)
                continue
            used |= set(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return NamedSharding(mesh, PartitionSpec(*out))

    def one(path, x):
        p = _path_str(path)
        axn = names.get(p, (None,) * np.ndim(x if not isinstance(x, QTensor) else x.values))
        if not isinstance(x, QTensor):
            return spec(axn, np.shape(x))
        ax = component_axes(x, axn)
        return jax.tree.map(lambda a, n: spec(n, a.shape), x, ax)  # ax: a name tuple where x has an array

    return jax.tree_util.tree_map_with_path(one, qparams, is_leaf=lambda v: isinstance(v, QTensor))
