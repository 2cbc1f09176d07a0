"""LoRA as a transform of the params tree: which Dense layers get an adapter, adding, splitting, merging.

An adapted Dense keeps its kernel W [in..., out...] and gains, in the same param scope,
    lora_a [in..., r]   (PEFT lora_A.weight [r, in] transposed; random init, like PEFT's kaiming-uniform)
    lora_b [r, out...]  (PEFT lora_B.weight [out, r] transposed; zero init, so a fresh adapter changes nothing)
    lora_scale []       alpha / r (rsLoRA: alpha / sqrt(r))
and computes x W + scale * (x a) b (jaxtx.lora.dense). With scan_layers these leaves are stacked [L, ...] like the
kernel; layers whose rank differs from the stack's largest (rank_pattern) are zero-padded, which is exact: a padded
column of a and row of b are both zero, so they add nothing and their gradients stay zero.

Targets are named as Hugging Face names the modules (jaxtx.hf.mapping gives the names): `q_proj`, `c_attn`, a full
name `model.layers.0.self_attn.q_proj`, a regex string (matched against whole names, as PEFT does), or `all-linear`
(every linear layer but the output head). GPT-2's fused c_attn is one HF module but three jaxtx Dense layers (q, k, v):
an adapter on it is one `a` shared by the three and `b` split in three.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxtx.config import ConfigError, ModelConfig

LORA_LEAVES = ("lora_a", "lora_b")  # trainable
FROZEN_LORA_LEAVES = ("lora_scale", "lora_dropout")
ALL_LORA_LEAVES = LORA_LEAVES + FROZEN_LORA_LEAVES


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapter recipe, with PEFT's meaning for every field.

    target_modules: a list of HF module names (a name matches a module whose full name is it or ends in `.name`),
    a regex string matched against whole module names, or "all-linear". rank_pattern / alpha_pattern: {name or regex:
    r / alpha}; the first key matching `(.*\\.)?(key)$` of a module's full name wins (PEFT's rule).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[tuple, str] = ("q_proj", "v_proj")
    rslora: bool = False
    rank_pattern: tuple = ()  # ((key, r), ...): a tuple of pairs so the config stays hashable
    alpha_pattern: tuple = ()
    quantize: Optional[str] = None  # QLoRA (training): quantize the frozen base, e.g. "nf4", "nf4-dq", "int8"

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("rank_pattern", "alpha_pattern"):
            v = getattr(self, name)
            if isinstance(v, dict):
                object.__setattr__(self, name, tuple(v.items()))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"lora.r={self.r!r}: expected an integer >= 1")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha!r}: expected a finite number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout!r}: expected a rate in [0, 1)")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                try:
                    re.compile(tm)
                except re.error as e:
                    raise ConfigError(f"lora.target_modules={tm!r}: not a valid regex ({e})") from None
        elif not tm or not all(isinstance(t, str) and t for t in tm):
            raise ConfigError(f"lora.target_modules={tm!r}: expected a non-empty list of module names, a regex "
                              "string or 'all-linear'")
        if self.quantize is not None:
            from jaxtx import quant
            try:
                quant.parse_scheme(self.quantize)
            except ValueError:
                raise ConfigError(f"lora.quantize={self.quantize!r}: expected int8, fp8, int4[-gN] or nf4[-gN][-dq] "
                                  "(or null for a float base)") from None
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            for k, v in getattr(self, name):
                if not isinstance(k, str) or not isinstance(v, kind) or isinstance(v, bool) or v <= 0:
                    raise ConfigError(f"lora.{name}[{k!r}]={v!r}: expected a positive "
                                      f"{'integer rank' if kind is int else 'alpha'}")

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, alpha) of the module with this full HF name."""
        r = _pattern_value(dict(self.rank_pattern), name, self.r)
        return r, float(_pattern_value(dict(self.alpha_pattern), name, self.alpha))

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():  # PEFT: the first key that matches wins
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class Site:
    """One HF linear module and the jaxtx Dense layer(s) it is (three for GPT-2's fused c_attn).

    paths: jaxtx module paths with the layer index in place, e.g. ("layers", 3, "attn", "q").
    in_shape: the kernel's input dims; out_shapes: each path's output dims; conv1d: GPT-2's [in, out] weights."""
    name: str
    paths: tuple
    in_shape: tuple
    out_shapes: tuple
    conv1d: bool = False

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _kernel_shapes(cfg: ModelConfig) -> dict[tuple, tuple]:
    """jaxtx kernel path (layer index in place, "kernel" dropped) -> per-layer kernel shape, from abstract params."""
    import flax.linen as nn

    import jaxtx.model
    # .value, not nn.unbox: unbox applies sharding constraints inside a mesh context, which fails on abstract values
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    abstract = jax.tree.map(lambda x: x.value if is_box(x) else x,
                            jaxtx.model.abstract_params(jaxtx.model.build(cfg)), is_leaf=is_box)
    out = {}

    def walk(tree, prefix, stacked):
        for k, v in tree.items():
            if isinstance(v, dict):
                if k == "layers":
                    walk(v, prefix + (k, None), True)
                elif k.startswith("layers_") and k[7:].isdigit():
                    walk(v, prefix + ("layers", int(k[7:])), False)
                else:
                    walk(v, prefix + (k,), stacked)
            elif k == "kernel":
                out[prefix] = tuple(v.shape[1:] if stacked else v.shape)
    walk(abstract, (), False)
    return out


def sites(cfg: ModelConfig) -> list[Site]:
    """Every linear module LoRA can adapt, in HF order (embeddings, the output head and MoE experts excluded)."""
    return list(_sites(cfg))


@functools.lru_cache(maxsize=32)
def _sites(cfg: ModelConfig) -> tuple:
    from jaxtx.hf import mapping
    from jaxtx.hf.config import family_of
    fam = family_of(cfg)
    conv1d = fam == "gpt2"
    shapes = _kernel_shapes(cfg)

    def generic(p):  # ("layers", 3, ...) -> ("layers", None, ...) when the model scans its layers
        return tuple(None if isinstance(x, int) and cfg.scan_layers else x for x in p)

    out = []
    for e in mapping.spec(cfg):
        if len(e.hf) != 1 or not e.hf[0].endswith(".weight") or not all(p[-1] == "kernel" for p in e.jax):
            continue
        name = e.hf[0][:-len(".weight")]
        if name == "lm_head" or e.jax[0] == ("lm_head", "kernel"):
            continue
        paths = tuple(p[:-1] for p in e.jax)
        kshapes = [shapes[generic(p)] for p in paths]
        hf_in = e.shapes[0][0] if conv1d else e.shapes[0][1]
        n_in = next(n for n in range(1, len(kshapes[0]) + 1) if math.prod(kshapes[0][:n]) == hf_in)
        out.append(Site(name, paths, kshapes[0][:n_in], tuple(k[n_in:] for k in kshapes), conv1d))
    return tuple(out)


def _refusal(cfg: ModelConfig, target: str) -> str:
    """Why a target name matches no adaptable module: it names an embedding, the head, MoE experts, or nothing."""
    from jaxtx.hf import mapping
    names = [n[:-len(".weight")] for e in mapping.spec(cfg) for n in e.hf if n.endswith(".weight")]
    hits = [n for n in names if n == target or n.endswith("." + target)]
    if any("expert" in n or n.endswith((".gate", ".router")) for n in hits):
        what = "an MoE expert/router module (LoRA on MoE layers is not supported)"
    elif any("embed" in n or n.endswith((".wte", ".wpe", "shared")) or "relative_attention_bias" in n for n in hits):
        what = "an embedding (LoRA on embeddings is not supported)"
    elif any(n == "lm_head" for n in hits):
        what = "the output head (LoRA on lm_head is not supported; it is tied to the embedding in many models)"
    else:
        linear = sorted({s.short for s in sites(cfg)})
        return f"lora.target_modules: {target!r} matches no linear module of {cfg.name!r}; its linear modules: {linear}"
    return f"lora.target_modules: {target!r} is {what}"


def resolve(cfg: ModelConfig, lcfg: LoraConfig) -> list[tuple[Site, int, float]]:
    """(site, r, scale) for every targeted module. Unknown or unsupported targets raise ConfigError."""
    all_sites = sites(cfg)
    tm = lcfg.target_modules
    if tm == "all-linear":
        chosen = all_sites
    elif isinstance(tm, str):
        chosen = [s for s in all_sites if re.fullmatch(tm, s.name)]
        if not chosen:
            raise ConfigError(f"lora.target_modules={tm!r}: the regex matches no linear module of {cfg.name!r} "
                              f"(names look like {all_sites[0].name!r})")
    else:
        for t in tm:
            if not any(s.name == t or s.name.endswith("." + t) for s in all_sites):
                raise ConfigError(_refusal(cfg, t))
        chosen = [s for s in all_sites if any(s.name == t or s.name.endswith("." + t) for t in tm)]
    out = []
    for s in chosen:
        r, alpha = lcfg.rank_alpha(s.name)
        out.append((s, r, lcfg.scale(r, alpha)))
    return out


# ------------------------------------------------------------------------------------------------ trees
def _put(tree: dict, path: tuple, leaves: dict) -> None:
    d = tree
    for k in path:
        d = d.setdefault(k, {})
    d.update(leaves)


def _layer_key(path: tuple, scan: bool) -> tuple[tuple, Optional[int]]:
    """A module path with its layer index -> (path in the params tree, index in the stacked arrays or None)."""
    i = next((n for n, p in enumerate(path) if isinstance(p, int)), None)
    if i is None:
        return path, None
    if scan:
        return path[:i] + path[i + 1:], path[i]
    return path[:i - 1] + (f"layers_{path[i]}",) + path[i + 1:], None


def build_adapters(cfg: ModelConfig, per_path: dict[tuple, tuple], dtype=jnp.float32,
                   dropout: float = 0.0) -> dict:
    """Adapter leaves as a params-shaped tree from {module path: (a [in..., r], b [r, out...], scale)}.

    Stacked layers: one array per leaf [L, ...] padded with zeros to the largest rank; a layer without an adapter
    gets zeros and scale 0."""
    tree: dict = {}
    groups: dict[tuple, dict[int, tuple]] = {}
    for path, abs_ in per_path.items():
        key, i = _layer_key(path, cfg.scan_layers)
        if i is None:
            a, b, s = abs_
            leaves = {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype),
                      "lora_scale": jnp.asarray(s, jnp.float32)}
            if dropout:
                leaves["lora_dropout"] = jnp.asarray(dropout, jnp.float32)
            _put(tree, key, leaves)
        else:
            groups.setdefault(key, {})[i] = abs_
    n_layers = {}
    for key, by_layer in groups.items():
        stack = key[:key.index("layers")]
        n_layers[key] = cfg.decoder_layers if stack == ("decoder",) else cfg.n_layers
        L = n_layers[key]
        a0, b0, _ = next(iter(by_layer.values()))
        r = max(v[0].shape[-1] for v in by_layer.values())
        in_shape, out_shape = a0.shape[:-1], b0.shape[1:]
        A = np.zeros((L,) + in_shape + (r,), np.float32)
        B = np.zeros((L, r) + out_shape, np.float32)
        S = np.zeros((L,), np.float32)
        for i, (a, b, s) in by_layer.items():
            A[i, ..., :a.shape[-1]] = np.asarray(a, np.float32)
            B[i, :b.shape[0]] = np.asarray(b, np.float32)
            S[i] = s
        leaves = {"lora_a": jnp.asarray(A, dtype), "lora_b": jnp.asarray(B, dtype), "lora_scale": jnp.asarray(S)}
        if dropout:
            leaves["lora_dropout"] = jnp.full((L,), dropout, jnp.float32)
        _put(tree, key, leaves)
    return tree


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, rng, dtype=jnp.float32) -> dict:
    """Fresh adapters for `lcfg`: a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), b = 0.
    GPT-2's c_attn gets one `a` shared by q, k and v, as PEFT has one lora_A for the fused module."""
    per_path = {}
    for n, (site, r, scale) in enumerate(resolve(cfg, lcfg)):
        fan_in = math.prod(site.in_shape)
        a = jax.random.uniform(jax.random.fold_in(rng, n), site.in_shape + (r,), jnp.float32,
                               -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        a = np.asarray(a)
        for path, out_shape in zip(site.paths, site.out_shapes):
            per_path[path] = (a, np.zeros((r,) + out_shape, np.float32), scale)
    return build_adapters(cfg, per_path, dtype, lcfg.dropout)


def is_lora_path(path) -> bool:
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", last)) in ALL_LORA_LEAVES


def _map_leaves(tree: dict, keep) -> dict:
    """Nested dict with only the leaves whose name passes `keep`; empty branches dropped."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _map_leaves(v, keep)
            if sub:
                out[k] = sub
        elif keep(k):
            out[k] = v
    return out


def split(params: dict) -> tuple[dict, dict]:
    """(trainable adapter leaves lora_a/lora_b, everything else: the frozen base plus lora_scale/lora_dropout)."""
    return (_map_leaves(params, lambda k: k in LORA_LEAVES), _map_leaves(params, lambda k: k not in LORA_LEAVES))


def strip(params: dict) -> dict:
    """The base params: every LoRA leaf removed (no copy; the arrays are shared)."""
    return _map_leaves(params, lambda k: k not in ALL_LORA_LEAVES)


def adapters(params: dict) -> dict:
    """Only the LoRA leaves (a, b, scale, dropout)."""
    return _map_leaves(params, lambda k: k in ALL_LORA_LEAVES)


def combine(*trees: dict) -> dict:
    """Deep union of params-shaped trees (base, adapters, ...); a leaf present in two trees is an error."""
    out: dict = {}
    for t in trees:
        for k, v in t.items():
            if isinstance(v, dict):
                out[k] = combine(out.get(k, {}), v)
            elif k in out:
                raise ValueError(f"combine: leaf {k!r} is in two trees")
            else:
                out[k] = v
    return out


def has_lora(params: dict) -> bool:
    return bool(adapters(params))


def add_lora(model, params: dict, lcfg: LoraConfig, rng, dtype=jnp.float32) -> dict:
    """params with fresh adapters added for `lcfg` (b = 0, so the model's outputs are unchanged)."""
    if has_lora(params):
        raise ValueError("add_lora: params already hold a LoRA adapter (merge(model, params) or strip(params) first)")
    return combine(params, init_adapters(model.cfg, lcfg, rng, dtype))


def delta(a, b, scale):
    """The kernel update scale * a b with a [stack..., in..., r], b [stack..., r, out...], scale [stack...]."""
    n_stack = jnp.ndim(scale)
    stack, in_shape = a.shape[:n_stack], a.shape[n_stack:-1]
    out_shape = b.shape[n_stack + 1:]
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(stack + (math.prod(in_shape), r))
    b2 = b.astype(jnp.float32).reshape(stack + (r, math.prod(out_shape)))
    d = jnp.matmul(a2, b2) * jnp.asarray(scale, jnp.float32).reshape(stack + (1, 1))
    return d.reshape(stack + in_shape + out_shape)


def merge(model, params: dict) -> dict:
    """Fold every adapter into its kernel (kernel += scale * a b, in float32, cast back) and drop the LoRA leaves.

    A quantized kernel (jaxtx.quant) is dequantized, merged and requantized; `merge_report` says how much error the
    requantization added."""
    return merge_report(model, params)[0]


def merge_report(model, params: dict) -> tuple[dict, dict]:
    """(merged params, {module path: error requantization added, relative to the kernel's max |value|} for quantized
    kernels; empty for a float base)."""
    report = {}

    def walk(tree, prefix):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v, prefix + (k,))
            elif k not in ALL_LORA_LEAVES:
                out[k] = v
        if "lora_a" in tree:
            d = delta(tree["lora_a"], tree["lora_b"], tree["lora_scale"])
            if tuple(d.shape) != _full_shape(tree["kernel"]):  # stack_adapters' [.., A+1, ..] leaves: no one merge
                raise ValueError(f"merge: {'/'.join(map(str, prefix))} holds several stacked adapters "
                                 "(stack_adapters); merge the params of one adapter instead")
            out["kernel"], err = _merge_kernel(tree["kernel"], d)
            if err is not None:
                report["/".join(map(str, prefix))] = err
        return out
    return walk(params, ()), report


def _full_shape(kernel) -> tuple:
    """A kernel's shape with its stack dims, float or quantized (a QTensor's shape excludes its batch dims)."""
    if hasattr(kernel, "batch_shape"):
        return tuple(kernel.batch_shape) + tuple(kernel.shape)
    return tuple(kernel.shape)


def _merge_kernel(kernel, d):
    """(kernel + d in the kernel's own format, extra requantization error or None for a float kernel)."""
    from jaxtx import quant
    if not quant.is_quantized(kernel):
        return (kernel.astype(jnp.float32) + d).astype(kernel.dtype), None
    from jaxtx.lora.qlora import merge_quantized
    return merge_quantized(kernel, d)


def adapter_shardings(adapter_tree: dict, base_shardings: dict) -> dict:
    """A NamedSharding for every LoRA leaf, derived from its kernel's, so adapters are sharded like the base:
    a [stack.., in.., r] keeps the kernel's stack and input-dim specs, b [stack.., r, out..] its stack and output-dim
    specs (r replicated), lora_scale / lora_dropout [stack..] the stack specs."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    def walk(ad, sh):
        out = {k: walk(v, sh[k]) for k, v in ad.items() if isinstance(v, dict)}
        if "lora_a" in ad:
            ks = sh["kernel"]
            if not hasattr(ks, "spec"):  # a quantized kernel's shardings (a QTensor of them): adapters replicated
                ks = NamedSharding(jax.tree.leaves(ks)[0].mesh, P())
            n_stack = jnp.ndim(ad["lora_scale"])
            n_in = jnp.ndim(ad["lora_a"]) - n_stack - 1
            n_out = jnp.ndim(ad["lora_b"]) - n_stack - 1
            spec = tuple(getattr(ks, "spec", ())) + (None,) * (n_stack + n_in + n_out)
            specs = {"lora_a": spec[:n_stack + n_in] + (None,),
                     "lora_b": spec[:n_stack] + (None,) + spec[n_stack + n_in:n_stack + n_in + n_out],
                     "lora_scale": spec[:n_stack], "lora_dropout": spec[:n_stack]}
            out.update({k: NamedSharding(ks.mesh, P(*specs[k])) for k in ad if not isinstance(ad[k], dict)})
        return out
    return walk(adapter_tree, base_shardings)


# ------------------------------------------------------------------------------------------------ many adapters
def stack_adapters(model, base_params: dict, adapter_trees) -> dict:
    """Base params plus several adapters stacked for serving them in one batch (jaxtx.lora.dense.selected_delta).

    adapter_trees: A adapters, each a params tree holding LoRA leaves (what load_peft or add_lora return; the base
    leaves in it are ignored). At every Dense that any of them adapts the result holds
        lora_a [stack..., A + 1, in..., r_max]   lora_b [stack..., A + 1, r_max, out...]   lora_scale [stack..., A + 1]
    where slot 0 is no adapter (zeros: the base alone) and slot i is adapter i (the i-th tree). stack is (L,) for a
    scanned model's layers, so the layer axis stays first, where nn.scan slices it, and the adapter axis comes next.
    Ranks are zero-padded to the largest (exact, as for rank_pattern: padded columns of a and rows of b are zero);
    an adapter that does not target a Dense has zeros there. lora_dropout is dropped (serving). The model then
    needs adapter_ids (model.apply(..., adapter_ids=[B, T] or [B] slots)). Raises ValueError when an adapter was
    made for another base (a LoRA leaf whose shape does not fit the base kernel beside it)."""
    trees = [adapters(t) for t in adapter_trees]
    if not trees:
        raise ValueError("stack_adapters: no adapters given")
    if has_lora(base_params):
        raise ValueError("stack_adapters: base_params already hold a LoRA adapter; pass the base (strip(params))")
    for i, t in enumerate(trees):
        if not t:
            raise ValueError(f"stack_adapters: adapter {i} holds no LoRA leaves (lora_a / lora_b / lora_scale)")
    base = strip(base_params)
    A = len(trees)
    out_tree: dict = {}

    def site_paths(tree, prefix=()):
        if "lora_a" in tree:
            yield prefix
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from site_paths(v, prefix + (k,))

    def get(tree, path):
        for k in path:
            if not isinstance(tree, dict) or k not in tree:
                return None
            tree = tree[k]
        return tree

    paths = list(dict.fromkeys(p for t in trees for p in site_paths(t)))
    for path in paths:
        name = "/".join(path)
        kernel = (get(base, path) or {}).get("kernel")
        if kernel is None:
            raise ValueError(f"stack_adapters: an adapter has LoRA leaves at {name} but the base has no kernel there "
                             "(an adapter for another model?)")
        present = [(i, get(t, path)) for i, t in enumerate(trees) if get(t, path) is not None]
        n_stack = jnp.ndim(present[0][1]["lora_scale"])
        kshape = _full_shape(kernel)
        for i, leaves in present:
            a, b = leaves["lora_a"], leaves["lora_b"]
            ok = (jnp.ndim(leaves["lora_scale"]) == n_stack and a.shape[:n_stack] == b.shape[:n_stack]
                  and a.shape[:-1] + b.shape[n_stack + 1:] == kshape)
            if not ok:
                raise ValueError(f"stack_adapters: adapter {i} at {name}: lora_a {list(a.shape)} / lora_b "
                                 f"{list(b.shape)} do not fit the base kernel {list(kshape)} (an adapter made for "
                                 "another base?)")
        a0, b0 = present[0][1]["lora_a"], present[0][1]["lora_b"]
        stack, in_shape, out_shape = a0.shape[:n_stack], a0.shape[n_stack:-1], b0.shape[n_stack + 1:]
        r = max(leaves["lora_a"].shape[-1] for _, leaves in present)
        dtype = jnp.result_type(*[leaves["lora_a"].dtype for _, leaves in present])
        a_st = np.zeros(stack + (A + 1,) + in_shape + (r,), np.float32)
        b_st = np.zeros(stack + (A + 1, r) + out_shape, np.float32)
        s_st = np.zeros(stack + (A + 1,), np.float32)
        for i, leaves in present:
            ri = leaves["lora_a"].shape[-1]
            a_st[(slice(None),) * n_stack + (i + 1,)][..., :ri] = np.asarray(leaves["lora_a"], np.float32)
            b_st[(slice(None),) * n_stack + (i + 1, slice(0, ri))] = np.asarray(leaves["lora_b"], np.float32)
            s_st[(slice(None),) * n_stack + (i + 1,)] = np.asarray(leaves["lora_scale"], np.float32)
        _put(out_tree, path, {"lora_a": jnp.asarray(a_st, dtype), "lora_b": jnp.asarray(b_st, dtype),
                              "lora_scale": jnp.asarray(s_st)})
    return combine(base, out_tree)

