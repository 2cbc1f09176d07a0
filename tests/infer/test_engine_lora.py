"""The engine serving several LoRA adapters over one base in the same batch: each request's tokens equal static
`jaxtx.infer.generate` with that one adapter applied (greedy), under mixed batches, random arrivals and preemption;
the prefix cache never hands pages computed under one adapter to another (or to the base) but is shared within one."""
import functools

import jax
import numpy as np
import pytest

from infer_models import small_model
from jaxtx.infer import for_decoding, generate
from jaxtx.infer.engine import Engine, EngineConfig
from jaxtx.lora import LoraConfig, add_lora
from lora_testing import random_b

# different ranks, targets and scales: the stacked step pads ranks and zeroes untargeted sites
CONFIGS = {"x": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
           "y": LoraConfig(r=2, alpha=4, target_modules="all-linear"),
           "z": LoraConfig(r=8, alpha=8, target_modules=["o_proj", "down_proj"], rslora=True)}


@functools.lru_cache(maxsize=None)
def setup():
    model, base = for_decoding(*small_model("llama"))
    singles = {n: random_b(add_lora(model, base, c, jax.random.key(i)), seed=i)
               for i, (n, c) in enumerate(CONFIGS.items())}
    cfg = EngineConfig(max_seqs=4, page_size=4, num_pages=64, max_tokens_per_step=16, min_token_bucket=16,
                       decode_steps=4, max_logprobs=2)
    return model, base, singles, Engine(model, base, cfg, adapters=singles)


N_NEW = 8  # with prompts of <= 16 tokens in pairs, every reference below is one generate shape per params tree


def reference(model, base, singles, prompts, names, n=N_NEW):
    """Static generate, one adapter (or the base) at a time, the prompts of that adapter together."""
    out = [None] * len(prompts)
    for name in dict.fromkeys(names):
        idx = [i for i, m in enumerate(names) if m == name]
        toks = generate(model, base if name is None else singles[name], [prompts[i] for i in idx],
                        max_new_tokens=n).tokens
        for i, t in zip(idx, toks):
            out[i] = t
    return out


def test_mixed_adapters_in_one_batch_match_single_adapter_generate():
    model, base, singles, eng = setup()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, size=int(k)).tolist() for k in rng.integers(5, 17, size=8)]
    names = [None, "x", "y", "z", "x", None, "z", "y"]
    ref = reference(model, base, singles, prompts, names)
    compiled = eng.compiled()
    assert eng.generate(prompts, max_new_tokens=N_NEW, adapter=names).tokens == ref
    # the adapters matter: the same prompts under the base give other tokens
    for name in CONFIGS:
        idx = [i for i, m in enumerate(names) if m == name]
        plain = generate(model, base, [prompts[i] for i in idx], max_new_tokens=N_NEW).tokens
        assert [ref[i] for i in idx] != plain, name
    # random arrivals, chunked prefill and preemption (few free pages): still each request's own adapter
    held = eng.sched.alloc.allocate(eng.sched.alloc.num_free - 12)
    pending, ids, got = list(range(len(prompts))), {}, {}
    while pending or eng.has_work():
        while pending and (not eng.has_work() or rng.random() < 0.5):
            i = pending.pop(0)
            ids[eng.add_request(prompts[i], max_new_tokens=N_NEW, adapter=names[i])] = i
        for ev in eng.step():
            got.setdefault(ids[ev.request_id], []).extend(ev.token_ids)
    eng.sched.alloc.release(held)
    assert [got[i] for i in range(len(prompts))] == ref
    assert eng.stats()["preemptions"] > 0
    assert eng.compiled() == compiled  # any mix of adapters runs the executables compiled at warm-up


def _run(eng, prompt, adapter, n=N_NEW):
    rid = eng.add_request(prompt, max_new_tokens=n, adapter=adapter)
    toks, cached = [], None
    while eng.has_work():
        for ev in eng.step():
            if ev.request_id == rid:
                toks += ev.token_ids
                cached = ev.cached_tokens
    return toks, cached


def test_prefix_cache_is_keyed_by_adapter():
    model, base, singles, eng = setup()
    prompt = np.random.default_rng(1).integers(0, 97, size=14).tolist()  # 3 full pages of 4 before the last token
    ref = reference(model, base, singles, [prompt] * 8, ["x", "y", None, "z"] * 2)
    before = eng.stats()["prefix_cached_tokens"]
    assert _run(eng, prompt, "x") == (ref[0], 0)
    assert _run(eng, prompt, "y") == (ref[1], 0)  # x's pages hold the same tokens but x's K/V: no hit
    assert _run(eng, prompt, None) == (ref[2], 0)
    assert _run(eng, prompt, "z") == (ref[3], 0)
    assert eng.stats()["prefix_cached_tokens"] == before  # no hit across adapters
    assert _run(eng, prompt, "x") == (ref[0], 12)  # within one adapter the prefix is shared
    assert _run(eng, prompt, None) == (ref[2], 12)
    assert eng.stats()["prefix_cached_tokens"] == before + 24


def test_bad_adapter_arguments():
    model, base, singles, eng = setup()
    with pytest.raises(ValueError, match=r"adapter='w': not one of this engine's LoRA adapters \['x', 'y', 'z'\]"):
        eng.add_request([1, 2], max_new_tokens=2, adapter="w")
    no_adapters = Engine(model, base, EngineConfig(max_seqs=2, page_size=4, num_pages=8, max_tokens_per_step=16),
                         warmup=False)
    with pytest.raises(ValueError, match=r"adapter='x'.*\[\]"):
        no_adapters.add_request([1, 2], max_new_tokens=2, adapter="x")
    with pytest.raises(ValueError, match="adapter name ''"):
        Engine(model, base, EngineConfig(max_seqs=2, page_size=4, num_pages=8, max_tokens_per_step=16),
               warmup=False, adapters={"": singles["x"]})


def test_adapters_over_a_tensor_sharded_base():
    """Base split over a 2-way tensor mesh, adapters replicated on it: each request still equals its single adapter."""
    from jaxtx import model as model_lib
    from jaxtx import sharding
    model, _ = small_model("llama", ("vocab_size=98",))
    mesh = sharding.make_mesh(sharding.MeshConfig(tensor=2), devices=jax.devices()[:2])
    rules = sharding.rules_for("tp")
    sharded = sharding.init_sharded(model, jax.random.key(0), mesh, rules, *model_lib.dummy_inputs(model.cfg))
    host = jax.device_get(sharded)
    singles = {"y": random_b(add_lora(model, host, CONFIGS["y"], jax.random.key(1)), seed=1)}  # all-linear
    cfg = EngineConfig(max_seqs=4, page_size=4, num_pages=64, max_tokens_per_step=16, min_token_bucket=16,
                       decode_steps=2, max_logprobs=0)
    eng = Engine(model, sharded, cfg, mesh=mesh, rules=rules, adapters=singles)
    q = eng.params["layers"]["attn"]["q"]
    assert len(q["lora_a"].sharding.device_set) == 2 and len(q["kernel"].sharding.device_set) == 2
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 97, size=int(k)).tolist() for k in rng.integers(5, 17, size=8)]
    names = ["y", None] * 4
    assert eng.generate(prompts, max_new_tokens=N_NEW, adapter=names).tokens == \
        reference(model, host, singles, prompts, names)
