"""Meshes, the one logical-axis rules table, and sharded params / optimizer state / batches.

Mesh axes are always ("data", "fsdp", "tensor", "expert") — axes of size 1 cost nothing, so one model and one step
function run unchanged on 1 CPU, 8 fake CPU devices, several processes or a pod. Meshes use AxisType.Auto: the
compiler (GSPMD) propagates shardings from the params, the batch and the `with_logical_constraint`s in the model.

    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh, rules = make_mesh(mesh_cfg), rules_for(mesh_cfg)
    with use_mesh(mesh, rules):               # jax.set_mesh + flax logical rules: constraints take effect
        params = init_sharded(model, rng, mesh, rules, ids_BT)

Rules semantics. Params are resolved strictly: each logical name maps to the mesh axes of its first rule, and a param
whose two dimensions land on one mesh axis, or whose dimension a mesh axis does not divide, is an error naming the
param.
Activations go through Flax's priority resolution (the first rule whose mesh axes are still free wins), so in
[batch, length, embed] `batch` claims data+fsdp and `embed` falls back to replicated — that is why `batch` comes first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxtx.config import ConfigError, coerce, load_config_file, parse_overrides, unknown_key_error

AXES = ("data", "fsdp", "tensor", "expert")
Rules = tuple  # tuple[tuple[str, str | tuple[str, ...] | None], ...] — Flax's LogicalRules format

# ------------------------------------------------------------------------------------------------ rules
# Feature -> rules it contributes. A preset is a '+'-joined set of features ("fsdp+tp+ep"). Tokens are always split over
# every non-tensor axis: fsdp and expert ranks are also data-parallel ranks outside the layers they shard (ZeRO-3, and
# the MaxText convention for EP). TP keeps the batch replicated over `tensor` (Megatron).
_BATCH = ("batch", ("data", "fsdp", "expert"))
_FEATURES: dict[str, tuple] = {
    "dp": (),
    # ZeRO-3: every weight with an `embed` dim (all matrices, norm scales) is split over fsdp; grads and optimizer
    # state follow because they are shaped and sharded like the params.
    "fsdp": (("embed", "fsdp"),),
    # Megatron: q/k/v and FFN-in are column-split (heads / mlp on the output side), o and FFN-out row-split (heads /
    # mlp on the input side); the vocab dim of embedding and head too, so logits are split over vocab.
    "tp": (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")),
    "ep": (("expert", "expert"),),
}
# Never split (listed so the table documents every logical name the model uses): lengths stay whole for the kernels.
_NEVER = tuple((n, None) for n in ("length", "head_dim", "layers", "pos", "types", "buckets", "capacity"))
PRESETS = ("dp", "fsdp", "tp", "ep", "fsdp+tp", "fsdp+ep", "tp+ep", "fsdp+tp+ep")


def preset_rules(preset: str) -> Rules:
    """Rules for a preset such as "fsdp+tp" (any '+'-joined subset of dp, fsdp, tp, ep)."""
    feats = [f.strip() for f in preset.lower().split("+") if f.strip()]
    bad = [f for f in feats if f not in _FEATURES]
    if bad or not feats:
        raise ConfigError(f"sharding preset {preset!r}: unknown part(s) {bad}; expected '+'-joined names from "
                          f"{list(_FEATURES)}, e.g. 'fsdp+tp'")
    rules = [_BATCH]
    for f in _FEATURES:  # fixed order, so "tp+fsdp" == "fsdp+tp"
        if f in feats:
            rules.extend(_FEATURES[f])
    return validate_rules(tuple(rules) + _NEVER)


def validate_rules(rules: Rules) -> Rules:
    """Reject unknown mesh axes and a name that uses one mesh axis twice."""
    for name, axes in rules:
        axes_t = _as_tuple(axes)
        unknown = [a for a in axes_t if a not in AXES]
        if unknown:
            raise ConfigError(f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {unknown}; expected {AXES}")
        if len(set(axes_t)) != len(axes_t):
            raise ConfigError(f"sharding rule {name!r} -> {axes!r}: a mesh axis appears twice")
    return tuple(rules)


def _as_tuple(axes) -> tuple:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


# ------------------------------------------------------------------------------------------------ mesh config
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis sizes within a slice (ICI: data, fsdp, tensor, expert) and across slices/hosts (DCN: dcn_*), like
    MaxText's ici_*/dcn_*. One ICI size may be -1 (= the remaining devices of a slice) and one DCN size may be -1
    (= the remaining slices). The mesh axis size is ici * dcn. `rules`: a preset ("fsdp+tp"), or "auto" = turn on
    the features whose axes are not 1."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1
    rules: str = "auto"

    def __post_init__(self):
        for group in (AXES, tuple("dcn_" + a for a in AXES)):
            sizes = [getattr(self, a) for a in group]
            for a, s in zip(group, sizes):
                if not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1):
                    raise ConfigError(f"MeshConfig.{a}={s!r}: expected a positive int or -1 (fill)")
            if sizes.count(-1) > 1:
                raise ConfigError(f"MeshConfig: at most one of {list(group)} may be -1, got "
                                  f"{dict(zip(group, sizes))}")
        if self.rules != "auto":
            preset_rules(self.rules)  # validates

    @property
    def ici(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def dcn(self) -> tuple[int, ...]:
        return tuple(getattr(self, "dcn_" + a) for a in AXES)

    @classmethod
    def from_dict(cls, d: dict, source: str = "mesh config") -> "MeshConfig":
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        clean = {}
        for k, v in (d or {}).items():
            if k not in types:
                raise unknown_key_error(f"MeshConfig ({source})", k, list(types))
            clean[k] = coerce("MeshConfig", k, v, {"str": str, "int": int}[types[k]])
        return cls(**clean)


def load_mesh_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> MeshConfig:
    """A preset under configs/meshes/ or a YAML path, then `axis=value` overrides."""
    path, d = load_config_file(name_or_path, ["meshes"], "mesh preset")
    d.update(parse_overrides(list(overrides), "axis=value, e.g. fsdp=4"))
    return MeshConfig.from_dict(d, str(path))


def rules_for(preset_or_cfg: str | MeshConfig | Rules) -> Rules:
    """Rules from a preset name, a MeshConfig (its `rules` field; "auto" picks features from axis sizes != 1), or an
    explicit rules tuple (validated and returned)."""
    if isinstance(preset_or_cfg, (tuple, list)):
        return validate_rules(tuple(preset_or_cfg))
    if isinstance(preset_or_cfg, str):
        return preset_rules(preset_or_cfg)
    cfg = preset_or_cfg
    if cfg.rules != "auto":
        return preset_rules(cfg.rules)
    on = lambda a: getattr(cfg, a) != 1 or getattr(cfg, "dcn_" + a) != 1  # noqa: E731
    feats = ["dp"] + [f for f, a in (("fsdp", "fsdp"), ("tp", "tensor"), ("ep", "expert")) if on(a)]
    return preset_rules("+".join(feats))


def mesh_shape(cfg: MeshConfig, n_devices: int, n_granules: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Resolve the -1 entries: (ici_shape, dcn_shape). n_granules = slices (or processes) available for DCN."""
    dcn = list(cfg.dcn)
    if -1 in dcn:
        rest = math.prod(s for s in dcn if s != -1)
        if n_granules % rest:
            raise ConfigError(f"MeshConfig: dcn sizes {dict(zip(AXES, cfg.dcn))} cannot fill {n_granules} slices")
        dcn[dcn.index(-1)] = n_granules // rest
    n_dcn = math.prod(dcn)
    if n_devices % n_dcn:
        raise ConfigError(f"MeshConfig: {n_devices} devices do not split into {n_dcn} DCN groups "
                          f"{dict(zip(AXES, dcn))}")
    per = n_devices // n_dcn
    ici = list(cfg.ici)
    if -1 in ici:
        rest = math.prod(s for s in ici if s != -1)
        if per % rest:
            raise ConfigError(f"MeshConfig: ICI sizes {_fmt(cfg.ici)} cannot fill {per} devices per slice: "
                              f"{per} is not divisible by {rest}")
        ici[ici.index(-1)] = per // rest
    if math.prod(ici) * n_dcn != n_devices:
        raise ConfigError(f"MeshConfig: ICI {_fmt(ici)} x DCN {_fmt(dcn)} = {math.prod(ici) * n_dcn} devices, "
                          f"but there are {n_devices}")
    return tuple(ici), tuple(dcn)


def _fmt(sizes) -> str:
    return " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes))


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor", "expert"), all AxisType.Auto. With DCN sizes > 1 the devices are
    grouped by slice (TPU slice_index) or, on CPU/GPU, by process, so only DCN axes cross the slow network."""
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    # DCN granules: TPU slices when there are several; otherwise processes (CPU/GPU devices report slice_index 0).
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    by_slice = n_slices > 1
    granules = n_slices if by_slice else len({d.process_index for d in devices})
    ici, dcn = mesh_shape(cfg, len(devices), granules)
    types = (AxisType.Auto,) * len(AXES)
    if math.prod(dcn) == 1:
        return jax.make_mesh(ici, AXES, axis_types=types, devices=devices)
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
    return Mesh(arr, AXES, axis_types=types)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
    """jax.set_mesh + Flax logical rules: inside, `nn.with_logical_constraint` and shard_map helpers see the mesh.
    Without it logical constraints are silently dropped."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


# ------------------------------------------------------------------------------------------------ params
def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None, *, shape=None,
                    what: str = "tensor") -> P:
    """Strict resolution for stored tensors: each name -> the mesh axes of its first rule. Errors name `what`."""
    table: dict[str, tuple] = {}
    for name, axes in rules:
        table.setdefault(name, _as_tuple(axes))
    used: dict[str, str] = {}
    out = []
    for i, name in enumerate(names):
        axes = table.get(name, ()) if name is not None else ()
        if mesh is not None:  # axes missing from this mesh (or of size 1) shard nothing
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        for a in axes:
            if a in used:
                raise ConfigError(f"{what}: logical axes {used[a]!r} and {name!r} of {tuple(names)} both map to mesh "
                                  f"axis {a!r}; one tensor cannot use a mesh axis twice — fix the rules")
            used[a] = name
        if mesh is not None and shape is not None and axes:
            n = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % n:
                raise ConfigError(f"{what} with shape {tuple(shape)}: dim {i} ({name!r}, size {shape[i]}) is not "
                                  f"divisible by mesh axis {'x'.join(axes)} of size {n}; change the mesh or rules")
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(model: nn.Module, mesh: Mesh, rules: Rules, *init_args, **init_kwargs):
    """(abstract params, shardings) without allocating anything: abstract params are ShapeDtypeStructs that carry
    their NamedSharding (ready for AOT lowering or an Orbax restore target)."""
    boxed = jax.eval_shape(lambda r: model.init(r, *init_args, **init_kwargs), jax.random.key(0))["params"]
    specs = nn.get_partition_spec(boxed)  # logical names per param (P() for unboxed leaves)
    # .value, not nn.unbox: unbox applies sharding constraints when a mesh is in context, which fails on abstract values
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    abstract = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)

    def one(path, spec, leaf):
        return NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh, shape=leaf.shape,
                                                   what=f"param {_path_str(path)}"))

    shardings = jax.tree_util.tree_map_with_path(one, specs, abstract, is_leaf=lambda x: isinstance(x, P))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def init_sharded(model: nn.Module, rng, mesh: Mesh, rules: Rules, *init_args, **init_kwargs):
    """Params created directly in their shards: jit(init, out_shardings) never holds a full copy on one device."""
    init_args = tuple(jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a for a in init_args)
    _, shardings = param_shardings(model, mesh, rules, *init_args, **init_kwargs)
    init = lambda r: nn.unbox(model.init(r, *init_args, **init_kwargs)["params"])  # noqa: E731
    with use_mesh(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)


def opt_state_shardings(optimizer, abstract_params, param_shardings):
    """Shardings for `optimizer.init(params)`: moments like their params, scalars (counts) replicated."""
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    state = jax.eval_shape(optimizer.init, abstract)
    import optax
    # tree_map_params finds the leaves shaped like params (mu, nu, ...) even inside chains / masks / inject_hparams.
    return optax.tree_map_params(optimizer, lambda _, s: s, state, param_shardings,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))


def init_opt_state(optimizer, params, param_shardings):
    """optimizer.init jitted onto the sharded layout (a plain jit would put the whole state on one device)."""
    out = opt_state_shardings(optimizer, params, param_shardings)
    return jax.jit(optimizer.init, out_shardings=out)(params)


def batch_sharding(mesh: Mesh, rules: Rules | None = None, ndim: int = 2) -> NamedSharding:
    """Sharding for a [B, T, ...] batch: B split over the `batch` rule's axes (default data, fsdp, expert)."""
    axes = dict((n, a) for n, a in reversed(rules or (_BATCH,))).get("batch", _BATCH[1])
    axes = tuple(a for a in _as_tuple(axes) if a in mesh.shape)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """[start, stop) of the global batch rows this process must load: the union of the rows of its devices. Each
    process feeds only these to `jax.make_array_from_process_local_data(sharding, local_rows)`."""
    idx = sharding.addressable_devices_indices_map((global_batch,))
    rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = rows[0][0], max(r[1] for r in rows)
    if any(b[0] != a[1] for a, b in zip(rows, rows[1:])):
        raise ValueError(f"process {jax.process_index()}: its batch rows {rows} are not one contiguous block; put the "
                         "DCN (cross-process) axes first in the batch rule")
    return start, stop


def global_batch(local: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
    """Per-process rows (from process_rows) -> global jax.Arrays sharded by `sharding` (a no-op copy on 1 process)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_batch_size, *v.shape[1:]))
            for k, v in local.items()}


def check_replicated(params, threshold_bytes: int = 1 << 20) -> list[str]:
    """Lines "path shape dtype MiB" for every param at or above threshold_bytes that is fully replicated over a
    multi-device mesh — the memory ZeRO-3 / TP were meant to save. Accepts arrays or ShapeDtypeStructs with
    .sharding."""
    found = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        s = getattr(x, "sharding", None)
        n_dev = len(s.device_set) if s is not None else 1
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        if s is not None and n_dev > 1 and s.is_fully_replicated and nbytes >= threshold_bytes:
            found.append(f"{_path_str(path)} {tuple(x.shape)} {np.dtype(x.dtype).name} {nbytes / 2**20:.2f} MiB")
    return found


# ------------------------------------------------------------------------------------------------ multi-process
def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize from flags, or — all None — from the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a TPU/SLURM cluster that jax detects). Call before any other jax use.
    A no-op for a single process with nothing configured."""
    import os
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and num_processes in (None, 1):
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise ConfigError(f"distributed: coordinator={coordinator!r}, num_processes={num_processes!r}, "
                          f"process_id={process_id!r}: give all three (flags or JAX_* environment variables)")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


# ------------------------------------------------------------------------------------------------ shard_map helpers
def _context(mesh, rules):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if rules is None:
        rules = tuple(nn.get_logical_axis_rules())
    return mesh, rules


def _active(mesh) -> bool:
    return mesh is not None and not getattr(mesh, "empty", False) and mesh.size > 1


def shard_map_kernel(fn: Callable, in_names: Sequence, out_names, mesh=None, rules: Rules | None = None) -> Callable:
    """Wrap a single-device kernel in jax.shard_map with specs from the rules. in_names: one tuple of logical names per
    positional array (None = replicated); out_names likewise (a tuple of tuples for several outputs). Without an
    active multi-device mesh the kernel is returned unchanged."""
    mesh, rules = _context(mesh, rules)
    if not _active(mesh):
        return fn
    spec = lambda names: P() if names is None else logical_to_spec(names, rules, mesh)  # noqa: E731
    in_specs = tuple(spec(n) for n in in_names)
    multi = isinstance(out_names, list)
    out_specs = [spec(n) for n in out_names] if multi else spec(out_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


_KW_NAMES = {"segment_ids": ("batch", None), "kv_segment_ids": ("batch", None), "alibi_slopes": ("heads",),
             "q_positions": ("batch", None), "kv_positions": ("batch", None),
             "k_scale": ("batch", "kv_heads", None), "v_scale": ("batch", "kv_heads", None)}


def _wrap_attention(fn, kv_names, mesh, rules):
    def wrapped(q, k, v, **kw):
        m, r = _context(mesh, rules)
        if not _active(m):
            return fn(q, k, v, **kw)
        arrays = {n: x for n, x in kw.items() if isinstance(x, (jax.Array, np.ndarray))}
        static = {n: x for n, x in kw.items() if n not in arrays}
        names = [("batch", None, "heads", None), kv_names, kv_names]
        for n, x in arrays.items():  # bias [B|1, H|1, T, S]: broadcast dims stay whole
            names.append((("batch" if x.shape[0] > 1 else None, "heads" if x.shape[1] > 1 else None, None, None))
                         if n == "bias" else _KW_NAMES.get(n, (None,) * x.ndim))

        def body(q, k, v, *rest):
            return fn(q, k, v, **dict(zip(arrays, rest)), **static)

        return shard_map_kernel(body, names, ("batch", None, "heads", None), m, r)(q, k, v, *arrays.values())

    return wrapped


def shard_map_attention(fn: Callable, mesh=None, rules: Rules | None = None) -> Callable:
    """attention(q_BTHh, k_BSKh, v_BSKh, **kw) -> o_BTHh wrapped in shard_map: batch split like the batch rule, heads
    and kv_heads like the TP rule, lengths and head_dim whole (the kernel needs every key). Array kwargs are split
    too (segment_ids, kv_segment_ids, alibi_slopes, bias); other kwargs pass through. Without a multi-device mesh in
    context it calls fn directly. GQA stays correct under TP: head h uses kv head h // G and both split in blocks."""
    return _wrap_attention(fn, ("batch", None, "kv_heads", None), mesh, rules)


def shard_map_decode_attention(fn: Callable, mesh=None, rules: Rules | None = None) -> Callable:
    """decode_attention(q_BTHh, k_BKSh, v_BKSh, **kw) (the KV-cache layout) wrapped like shard_map_attention;
    q_positions [B, T], kv_positions [B, S], k_scale / v_scale [B, K, S] are split over batch (and kv heads)."""
    return _wrap_attention(fn, ("batch", "kv_heads", None, None), mesh, rules)
