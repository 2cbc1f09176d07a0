"""Engine scheduling, paging, prefix caching, preemption and per-request sampling, on a one-layer paged toy LM
(engine_toy.py) checked against the same weights' full-sequence forward. Fast: a few engines, cached per config."""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_toy import ToyPagedCache, toy
from infer_models import full_forward, naive_greedy
from jaxtx.infer import Sampling
from jaxtx.infer.engine import Engine, EngineConfig

V = 61


@functools.lru_cache(maxsize=None)
def engine(window=None, **kw):
    """Few configs, each compiled once per session (compiling dominates): the default has two token buckets, a
    decode loop and the prompt-logprobs variant; `squeeze` emulates smaller pools without recompiling."""
    m, p = toy(window)
    cfg = EngineConfig(**{**dict(max_seqs=4, page_size=4, num_pages=48, max_tokens_per_step=16, min_token_bucket=8,
                                 decode_steps=4, max_logprobs=5, prompt_logprobs=window is None), **kw})
    return Engine(m, p, cfg, cache=ToyPagedCache.init(m.cfg, cfg.num_pages, cfg.page_size))


@contextlib.contextmanager
def squeeze(eng, usable):
    """Hold all but `usable` pages of the pool (a small pool without a new compile)."""
    held = eng.sched.alloc.allocate(eng.sched.alloc.num_free - usable) if usable is not None else []
    try:
        yield
    finally:
        eng.sched.alloc.release(held)


def assert_pool_free(eng):
    st = eng.stats()
    assert st["pages_used"] == 0 and st["running"] == 0 and st["waiting"] == 0, st
    eng.sched.alloc.check()
    assert sorted(eng.sched.free_slots) == list(range(eng.config.max_seqs))


def drive(eng, reqs, rng, *, arrive_p=0.5, held=None):
    """Add (prompt, kwargs) requests at random steps; -> {index: (tokens, last event)}. held: pages are held by
    `squeeze` (the pool is free once they are given back)."""
    pending, ids, out = list(enumerate(reqs)), {}, {}
    while pending or eng.has_work():
        while pending and (not eng.has_work() or rng.random() < arrive_p):
            i, (prompt, kw) = pending.pop(0)
            ids[eng.add_request(prompt, **kw)] = i
        for ev in eng.step():
            toks, _ = out.get(ids[ev.request_id], ([], None))
            out[ids[ev.request_id]] = (toks + ev.token_ids, ev)
    if held is None:
        assert_pool_free(eng)
    return out


def prompts(rng, n, lo=1, hi=30):
    return [rng.integers(0, V, size=int(k)).tolist() for k in rng.integers(lo, hi, size=n)]


@pytest.mark.parametrize("window, cfg, usable", [
    (None, {}, None), (None, {}, 12), (5, {}, None), (5, {}, 6),
    (None, dict(max_tokens_per_step=8, min_token_bucket=8, page_size=2, num_pages=40, decode_steps=1,
                prompt_logprobs=False), 24)])
def test_greedy_matches_full_forward_under_random_arrivals_budgets_and_preemption(window, cfg, usable):
    eng = engine(window, **cfg)
    m, p = eng.model, eng.params
    rng = np.random.default_rng(len(cfg) + (window or 0) + (usable or 0))
    ps = prompts(rng, 9)
    news = rng.integers(1, 14, size=len(ps)).tolist()
    before = eng.stats()["preemptions"]
    with squeeze(eng, usable):
        out = drive(eng, [(pr, dict(max_new_tokens=n)) for pr, n in zip(ps, news)], rng, held=usable)
    for i, (pr, n) in enumerate(zip(ps, news)):
        assert out[i][0] == naive_greedy(m, p, pr, n), i
        assert out[i][1].finish_reason == "length"
    if eng.config.decode_steps > 1:
        assert eng.stats()["decode_loops"] > 0  # the multi-step loop ran (and matched)
    if usable is not None and window is None:  # (window models free pages as they go: 6 pages may be plenty)
        assert eng.stats()["preemptions"] > before  # the small pool did force preemption


def test_generate_returns_generation_and_strips_stop_sequences():
    eng = engine()
    m, p = eng.model, eng.params
    rng = np.random.default_rng(3)
    ps = prompts(rng, 5)
    ref = [naive_greedy(m, p, pr, 12) for pr in ps]
    stop = [ref[0][3], ref[1][4:6]]  # a token and a two-token sequence seen in the reference outputs
    got = eng.generate(ps, max_new_tokens=12, stop=stop, return_logprobs=True)

    def cut(r):
        for k in range(1, len(r) + 1):
            if r[k - 1] == stop[0]:
                return r[:k - 1], "stop"
            if r[:k][-2:] == stop[1]:
                return r[:k - 2], "stop"
        return r, "length"
    assert [(t, f) for t, f in zip(got.tokens, got.finish_reasons)] == [cut(r) for r in ref]
    assert [len(l) for l in got.logprobs] == [len(t) for t in got.tokens]
    assert_pool_free(eng)


def test_logprobs_topn_and_prompt_logprobs_match_the_full_forward():
    eng = engine()
    m, p = eng.model, eng.params
    prompt = [3, 9, 27, 1, 40, 8, 8, 2, 50, 7, 11]
    n = 6
    ref = naive_greedy(m, p, prompt, n)
    logits = np.asarray(full_forward(m)(p, jnp.asarray([prompt + ref])))[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    rid = eng.add_request(prompt, max_new_tokens=n, logprobs=3, prompt_logprobs=True)
    evs = []
    while eng.has_work():
        evs += [e for e in eng.step() if e.request_id == rid]
    toks = sum((e.token_ids for e in evs), [])
    assert toks == ref
    lps = sum((e.logprobs for e in evs), [])
    np.testing.assert_allclose(lps, [logp[len(prompt) - 1 + i, t] for i, t in enumerate(ref)], atol=1e-5)
    tops = sum((e.top_logprobs for e in evs), [])
    for i, top in enumerate(tops):
        row = logp[len(prompt) - 1 + i]
        assert list(top) == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose(list(top.values()), np.sort(row)[::-1][:3], atol=1e-5)
    plp = evs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt) and all(e.prompt_logprobs is None for e in evs[1:])
    np.testing.assert_allclose(plp[1:], [logp[j, prompt[j + 1]] for j in range(len(prompt) - 1)], atol=1e-5)
    assert evs[-1].finished and evs[-1].prompt_tokens == len(prompt)
    assert_pool_free(eng)


def test_prefix_cache_hits_give_the_same_tokens():
    eng = engine()
    m, p = eng.model, eng.params
    rng = np.random.default_rng(7)
    system = rng.integers(0, V, size=13).tolist()
    ps = [system + rng.integers(0, V, size=k).tolist() for k in (0, 3, 6, 1)]
    first = eng.generate(ps[:1], max_new_tokens=5)  # fills the cache with the system prompt's pages
    assert first.tokens[0] == naive_greedy(m, p, ps[0], 5)
    before = eng.stats()["prefix_cached_tokens"]
    out = drive(eng, [(pr, dict(max_new_tokens=5)) for pr in ps], rng, arrive_p=0.0)
    assert eng.stats()["prefix_cached_tokens"] - before >= 12 * 3
    for i, pr in enumerate(ps):
        assert out[i][0] == naive_greedy(m, p, pr, 5)
    # a full hit (the exact same prompt, a multiple of the page size) still recomputes the last token
    assert out[0][1].cached_tokens == 12 and len(ps[0]) == 13
    exact = system[:12]
    a = eng.generate([exact], max_new_tokens=3).tokens[0]
    rid = eng.add_request(exact, max_new_tokens=3)
    evs = []
    while eng.has_work():
        evs += eng.step()
    assert evs[-1].cached_tokens == 8 and sum((e.token_ids for e in evs), []) == a == naive_greedy(m, p, exact, 3)
    # a different salt sees none of it
    rid = eng.add_request(ps[1], max_new_tokens=2, cache_salt="tenant-b")
    evs = []
    while eng.has_work():
        evs += eng.step()
    assert evs[-1].request_id == rid and evs[-1].cached_tokens == 0
    assert_pool_free(eng)


SAMPLERS = [Sampling(temperature=0.9), Sampling(temperature=1.3, top_k=5), Sampling(temperature=0.7, top_p=0.8),
            Sampling(temperature=1.0, min_p=0.2, repetition_penalty=1.3),
            Sampling(temperature=1.1, frequency_penalty=0.5, presence_penalty=0.4, top_k=20, top_p=0.9)]


def test_sampled_tokens_depend_only_on_prompt_settings_and_seed():
    eng = engine()
    rng = np.random.default_rng(11)
    ps = prompts(rng, len(SAMPLERS), 4, 20)
    reqs = [(pr, dict(max_new_tokens=10, sampling=s, seed=100 + i)) for i, (pr, s) in enumerate(zip(ps, SAMPLERS))]
    alone = [drive(eng, [r], rng)[0][0] for r in reqs]
    before = eng.stats()["preemptions"]
    with squeeze(eng, 12):  # a small pool: preemption in the mixed run must not change the samples either
        mixed = drive(eng, reqs[::-1] + [(prompts(rng, 1)[0], dict(max_new_tokens=8, sampling=SAMPLERS[0], seed=5))],
                      rng, arrive_p=0.7, held=12)
    assert eng.stats()["preemptions"] > before
    assert_pool_free(eng)
    assert [mixed[len(reqs) - 1 - i][0] for i in range(len(reqs))] == alone
    other = drive(eng, [(ps[0], dict(max_new_tokens=10, sampling=SAMPLERS[0], seed=999))], rng)[0][0]
    assert other != alone[0]  # the seed matters


def test_penalties_change_greedy_as_the_formula_says():
    eng = engine()
    m, p = eng.model, eng.params
    prompt = [5, 5, 6, 7, 8, 9]
    s = Sampling(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    got = eng.generate([prompt], max_new_tokens=6, sampling=s).tokens[0]
    seq, out = list(prompt), []
    for _ in range(6):
        x = np.asarray(full_forward(m)(p, jnp.asarray([seq])))[0, -1].astype(np.float32)
        seen = np.isin(np.arange(V), seq)
        x = np.where(seen, np.where(x > 0, x / 1.5, x * 1.5), x)
        c = np.bincount(out, minlength=V).astype(np.float32)
        x = x - 0.3 * c - 0.2 * (c > 0)
        out.append(int(np.argmax(x)))
        seq.append(out[-1])
    assert got == out


def test_allowed_tokens_bitmask():
    eng = engine()
    m, p = eng.model, eng.params
    allowed = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59}

    def mask(generated):
        w = np.zeros(2, np.uint32)
        for t in allowed - set(generated):  # each token at most once
            w[t // 32] |= np.uint32(1 << (t % 32))
        return w.view(np.int32)
    prompt = [1, 4, 9, 16]
    rid = eng.add_request(prompt, max_new_tokens=8, allowed_tokens=mask)
    toks = []
    while eng.has_work():
        toks += sum((e.token_ids for e in eng.step()), [])
    seq = list(prompt)
    for t in toks:
        x = np.asarray(full_forward(m)(p, jnp.asarray([seq])))[0, -1]
        ok = np.array([i in allowed and i not in toks[:len(seq) - len(prompt)] for i in range(V)])
        assert t == int(np.argmax(np.where(ok, x, -np.inf)))
        seq.append(t)
    assert len(set(toks)) == 8 and set(toks) <= allowed
    assert_pool_free(eng)


def test_abort_frees_everything():
    eng = engine()
    rng = np.random.default_rng(4)
    ids = [eng.add_request(pr, max_new_tokens=20) for pr in prompts(rng, 6, 10, 30)]
    eng.step()
    eng.step()
    assert eng.stats()["pages_used"] > 0
    for i in ids[::2]:
        eng.abort(i)
    evs = eng.step()
    aborted = [e for e in evs if e.finish_reason == "abort"]
    assert sorted(e.request_id for e in aborted) == sorted(ids[::2]) and all(e.finished for e in aborted)
    while eng.has_work():
        evs = eng.step()
        assert not any(e.request_id in ids[::2] for e in evs)
    eng.abort("no-such-request")
    assert eng.step() == []
    assert_pool_free(eng)


def test_nan_filled_pool_changes_nothing():
    eng = engine()
    m, p = eng.model, eng.params
    rng = np.random.default_rng(8)
    ps = prompts(rng, 6)
    eng.generate(ps, max_new_tokens=4)  # leave written (and cached) pages behind
    c = eng.state.cache
    eng.state = eng.state._replace(cache=c.replace(k=jnp.full_like(c.k, jnp.nan), v=jnp.full_like(c.v, jnp.nan)))
    eng.sched.alloc.__init__(eng.config.num_pages, eng.config.page_size)  # the NaN pages hold no valid prefix now
    got = eng.generate(ps, max_new_tokens=9)
    assert got.tokens == [naive_greedy(m, p, pr, 9) for pr in ps]
    assert_pool_free(eng)


def test_zero_compilations_after_warmup():
    eng = engine()
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: traces.append(name) if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    n0 = eng.compiled()
    rng = np.random.default_rng(5)
    reqs = []
    for i, pr in enumerate(prompts(rng, 10, 1, 40)):
        kw = dict(max_new_tokens=int(rng.integers(1, 12)), sampling=SAMPLERS[i % len(SAMPLERS)], seed=i,
                  logprobs=int(rng.integers(0, 6)) if i % 2 else None, prompt_logprobs=i % 3 == 0,
                  stop=[[int(rng.integers(V)), int(rng.integers(V))]] if i % 4 == 0 else None,
                  eos_id=int(rng.integers(V)))
        reqs.append((pr, kw))
    drive(eng, reqs, rng)
    assert eng.compiled() == n0 and traces == []


def test_add_request_errors():
    eng = engine()
    for call, match in [
        (lambda: eng.add_request([1] * 180, max_new_tokens=20), "exceeds max_model_len=192"),
        (lambda: eng.add_request([], max_new_tokens=2), "empty"),
        (lambda: eng.add_request([V], max_new_tokens=2), "outside the vocabulary"),
        (lambda: eng.add_request([1], max_new_tokens=0), "max_new_tokens=0"),
        (lambda: eng.add_request([1], max_new_tokens=2, logprobs=6), "logprobs=6"),
        (lambda: eng.add_request([1], max_new_tokens=2, stop=["x"]), "strings need a tokenizer"),
        (lambda: eng.add_request([1], max_new_tokens=2, allowed_tokens=3), "allowed_tokens=3"),
        (lambda: eng.add_request([1], max_new_tokens=2, seed=-1), "seed=-1"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    m, p = toy()
    big = EngineConfig(max_seqs=4, page_size=4, num_pages=48, max_tokens_per_step=16, max_model_len=400)
    lazy = Engine(m, p, big, cache=ToyPagedCache.init(m.cfg, 48, 4), warmup=False)  # validation needs no compile
    with pytest.raises(ValueError, match="needs 50 pages of 4 but the pool has num_pages=48: it can never fit"):
        lazy.add_request([1] * 180, max_new_tokens=20)
    eng.add_request([1], max_new_tokens=1, request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], max_new_tokens=1, request_id="dup")
    while eng.has_work():
        eng.step()
    assert_pool_free(eng)


def test_a_failing_allowed_tokens_callable_ends_only_its_request():
    eng = engine()
    m, p = eng.model, eng.params
    good = eng.add_request([1, 2, 3], max_new_tokens=5)
    bad = eng.add_request([4, 5, 6], max_new_tokens=5, allowed_tokens=lambda gen: np.zeros(7, np.int32))
    evs = []
    while eng.has_work():
        evs += eng.step()
    end = [e for e in evs if e.request_id == bad]
    assert len(end) == 1 and end[0].finish_reason == "abort" and "shape (7,); expected (2,)" in end[0].error
    assert sum((e.token_ids for e in evs if e.request_id == good), []) == naive_greedy(m, p, [1, 2, 3], 5)
    assert_pool_free(eng)


def test_sliding_window_pages_are_freed_as_the_window_moves():
    eng = engine(5)
    m, p = eng.model, eng.params
    prompt = list(range(1, 41))
    rid = eng.add_request(prompt, max_new_tokens=30)
    toks, peak = [], 0
    while eng.has_work():
        toks += sum((e.token_ids for e in eng.step()), [])
        peak = max(peak, eng.stats()["pages_used"])
    assert toks == naive_greedy(m, p, prompt, 30)
    # 70 tokens would hold 18 pages of 4; the window (5) + a 16-token chunk never needs more than 7
    assert peak <= eng.sched.max_pages(70) == 7
    assert_pool_free(eng)
