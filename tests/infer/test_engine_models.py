"""The engine on real jaxtx models (PagedKVCache + ragged paged attention): greedy and sampled tokens equal
`jaxtx.infer.generate` for every decoder family under random arrivals and preemption, HF fixture greedy tokens, a
NaN-filled pool, and no compilation after warm-up."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jaxtx.paged_cache", reason="PagedKVCache (engine contract H5) not in the tree yet")

from infer_models import small_model  # noqa: E402
from jaxtx.infer import Sampling, for_decoding, generate  # noqa: E402
from jaxtx.infer.engine import Engine, EngineConfig  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
FAMILIES = ["llama", "window", "gpt2", "moe"]


def config(**kw):
    return EngineConfig(**{**dict(max_seqs=4, page_size=4, num_pages=64, max_tokens_per_step=16, min_token_bucket=16,
                                  decode_steps=4, max_logprobs=2), **kw})


@functools.lru_cache(maxsize=None)
def engine(family):
    model, params = for_decoding(*small_model(family))
    return Engine(model, params, config())


def assert_pool_free(eng):
    st = eng.stats()
    assert st["pages_used"] == 0 and st["running"] == 0 and st["waiting"] == 0, st
    eng.sched.alloc.check()


def drive(eng, reqs, rng, usable=None):
    """Requests (prompt, kwargs) added at random steps, with all but `usable` pages held -> tokens per request."""
    held = eng.sched.alloc.allocate(eng.sched.alloc.num_free - usable) if usable else []
    pending, ids, out = list(enumerate(reqs)), {}, {}
    while pending or eng.has_work():
        while pending and (not eng.has_work() or rng.random() < 0.5):
            i, (prompt, kw) = pending.pop(0)
            ids[eng.add_request(prompt, **kw)] = i
        for ev in eng.step():
            out.setdefault(ids[ev.request_id], []).extend(ev.token_ids)
    eng.sched.alloc.release(held)
    assert_pool_free(eng)
    return [out[i] for i in range(len(reqs))]


def prompts(rng, n, vocab=97):
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in rng.integers(1, 40, size=n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_generate_under_random_arrivals_and_preemption(family):
    eng = engine(family)
    rng = np.random.default_rng(FAMILIES.index(family))
    ps = prompts(rng, 8)
    ref = generate(eng.model, eng.params, ps, max_new_tokens=12).tokens
    assert eng.generate(ps, max_new_tokens=12).tokens == ref
    before = eng.stats()["preemptions"]
    got = drive(eng, [(p, dict(max_new_tokens=12)) for p in ps], rng, usable=14)
    assert got == ref
    if family != "window":
        assert eng.stats()["preemptions"] > before


@pytest.mark.parametrize("family", ["llama", "window"])
def test_sampled_matches_generate_per_seed(family):
    eng = engine(family)
    rng = np.random.default_rng(9)
    ps = prompts(rng, 5)
    for s in (Sampling(temperature=0.9, top_k=20, top_p=0.9),
              Sampling(temperature=1.2, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3)):
        ref = generate(eng.model, eng.params, ps, max_new_tokens=10, sampling=s, seed=42)
        assert eng.generate(ps, max_new_tokens=10, sampling=s, seed=42).tokens == ref.tokens
        # and one at a time, in reverse order, with others in the batch: each request's samples stay the same
        mixed = drive(eng, [(p, dict(max_new_tokens=10, sampling=s, seed=42 + i)) for i, p in enumerate(ps)][::-1]
                      + [(ps[0], dict(max_new_tokens=6, seed=7))], rng, usable=14)
        assert mixed[:len(ps)][::-1] == ref.tokens


def test_nan_pool_and_no_compilation_after_warmup():
    eng = engine("llama")
    rng = np.random.default_rng(3)
    ps = prompts(rng, 6)
    ref = generate(eng.model, eng.params, ps, max_new_tokens=9).tokens
    nan = lambda a: jnp.full_like(a, jnp.nan) if jnp.issubdtype(a.dtype, jnp.floating) else a
    eng.state = eng.state._replace(cache=jax.tree.map(nan, eng.state.cache))
    eng.sched.alloc.__init__(eng.config.num_pages, eng.config.page_size)  # NaN pages hold no cached prefix
    n0 = eng.compiled()
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: traces.append(name) if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    assert eng.generate(ps, max_new_tokens=9).tokens == ref
    out = drive(eng, [(p, dict(max_new_tokens=int(rng.integers(1, 12)), logprobs=1, seed=i,
                               sampling=Sampling(temperature=float(rng.uniform(0, 1.5)),
                                                 top_k=int(rng.integers(0, 9)))))
                      for i, p in enumerate(prompts(rng, 8))], rng)
    assert len(out) == 8 and eng.compiled() == n0 and traces == []


@pytest.mark.parametrize("name", ["llama", "mistral", "mixtral", "gpt2"])
def test_hf_fixture_greedy_through_the_engine(name):
    path = FIXTURES / name
    if not (path / "expected.npz").exists():
        pytest.skip(f"fixture {name} not present")
    from jaxtx import hf
    model, params = for_decoding(*hf.load(path))
    exp = np.load(path / "expected.npz")
    ids = exp["prompt_ids"]
    lens = exp["prompt_mask"].sum(1) if "prompt_mask" in exp else [ids.shape[1]] * len(ids)
    rows = [ids[b, : int(lens[b])].tolist() for b in range(len(ids))]
    eng = Engine(model, params, config(page_size=8, num_pages=32, decode_steps=1))
    assert eng.generate(rows, max_new_tokens=exp["greedy_ids"].shape[1]).tokens == exp["greedy_ids"].tolist()
    assert_pool_free(eng)


def test_int8_pages_match_the_int8_static_cache():
    model, params = for_decoding(*small_model("llama"))
    eng = Engine(model, params, config(quantize_kv=True, decode_steps=1))
    ps = prompts(np.random.default_rng(5), 6)
    ref = generate(model, params, ps, max_new_tokens=10, quantize_kv=True).tokens
    assert eng.generate(ps, max_new_tokens=10).tokens == ref
    assert_pool_free(eng)


def test_scanned_layers_and_prefix_cache_hits_match_generate():
    """The scanned (stacked) layer layout through the engine, and prefix-cache hits on a real model: requests
    sharing a 13-token system prompt (3 full pages) reuse its pages and still give generate's tokens."""
    model, params = small_model("llama")
    assert model.cfg.scan_layers
    eng = Engine(model, params, config(decode_steps=1, max_logprobs=0))
    rng = np.random.default_rng(2)
    system = rng.integers(0, 97, 13).tolist()
    ps = [system + rng.integers(0, 97, k).tolist() for k in (0, 2, 5, 9)]
    ref = generate(model, params, ps, max_new_tokens=7).tokens
    assert eng.generate(ps[:1], max_new_tokens=7).tokens == ref[:1]
    before = eng.stats()["prefix_cached_tokens"]
    assert eng.generate(ps, max_new_tokens=7).tokens == ref
    assert eng.stats()["prefix_cached_tokens"] - before >= 4 * 12
    assert_pool_free(eng)


def test_sharded_params_over_a_tensor_mesh():
    """Params split over a 2-way tensor axis (kv heads 2 -> one per device): the pages follow, tokens unchanged."""
    from jaxtx import model as model_lib
    from jaxtx import sharding
    model, _ = small_model("llama", ("vocab_size=98",))  # the vocab splits over tensor too
    mesh = sharding.make_mesh(sharding.MeshConfig(tensor=2), devices=jax.devices()[:2])
    rules = sharding.rules_for("tp")
    sharded = sharding.init_sharded(model, jax.random.key(0), mesh, rules, *model_lib.dummy_inputs(model.cfg))
    eng = Engine(model, sharded, config(decode_steps=2, max_logprobs=0), mesh=mesh, rules=rules)
    k0 = eng.state.cache.k if eng.state.cache.stacked else eng.state.cache.k[0]
    assert len(k0.sharding.device_set) == 2 and k0.addressable_shards[0].data.shape[-4] == 1
    ps = prompts(np.random.default_rng(6), 5)
    ref = generate(model, jax.device_get(sharded), ps, max_new_tokens=8).tokens  # unsharded, same weights
    assert eng.generate(ps, max_new_tokens=8).tokens == ref
    assert_pool_free(eng)
