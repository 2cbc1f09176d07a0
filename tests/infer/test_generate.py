"""The decoding loop against references: the full forward pass (no cache), each prompt alone, greedy without cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtx.infer import Sampling, generate, stream
from jaxtx import decode
from jaxtx.infer import generation
from jaxtx.infer.prompts import PromptError

from infer_models import full_forward, naive_greedy, small_model


@pytest.mark.parametrize("family", ["llama", "window", "moe", "gpt2"])
def test_prefill_then_decode_matches_full_forward(family):
    """Padded prefill of two prompts of different lengths, then single-token steps at per-row positions: the logits at
    every position equal the full forward pass of each sequence alone (the window family runs well past W=4)."""
    model, params = small_model(family)
    seqs = np.random.default_rng(1).integers(0, 97, (2, 14)).astype(np.int32)
    plens = np.array([3, 6], np.int32)
    step = decode.step_fn(model, params)
    ids = np.zeros((2, 8), np.int32)
    for b in range(2):
        ids[b, : plens[b]] = seqs[b, : plens[b]]
    st = jax.jit(lambda i, l: decode.prefill(step, model.cfg, i, l, jnp.ones(2, bool), max_new=12, max_len=20,
                                                 sampling=Sampling(), want_logprobs=False))(ids, plens)
    got = [[np.asarray(st.logits[b])] for b in range(2)]
    cache, pos = st.cache, plens.copy()
    step_j = jax.jit(step)
    for _ in range(14 - 3):
        live = pos < 14
        tok = np.where(live, seqs[np.arange(2), np.minimum(pos, 13)], 0)
        logits, cache = step_j(jnp.asarray(tok[:, None]), jnp.asarray(np.where(live, pos, -1)[:, None]), cache)
        for b in range(2):
            if live[b]:
                got[b].append(np.asarray(logits[b, 0]))
        pos = pos + 1
    full = np.asarray(full_forward(model)(params, jnp.asarray(seqs)))
    for b in range(2):
        np.testing.assert_allclose(np.stack(got[b]), full[b, plens[b] - 1:], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", ["llama", "window"])
def test_greedy_matches_cacheless_greedy_and_padding_changes_nothing(family):
    model, params = small_model(family)
    prompts = [[5, 17, 3], [9, 1, 2, 60, 33, 7, 8], [44]]
    out = generate(model, params, prompts, max_new_tokens=10)
    assert out.finish_reasons == ["length"] * 3
    for b, p in enumerate(prompts):
        assert out.tokens[b] == naive_greedy(model, params, p, 10), b
        assert generate(model, params, [p], max_new_tokens=10).tokens[0] == out.tokens[b]
    assert len(set(sum(out.tokens, []))) > 8  # the model does not collapse onto one token: the test has power


def test_sampling_with_per_row_seeds_is_batch_independent():
    model, params = small_model("llama")
    s = Sampling(temperature=1.0, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5)
    prompts = [[5, 17, 3], [9, 1, 2, 60, 33]]
    both = generate(model, params, prompts, max_new_tokens=8, sampling=s, seed=[11, 12])
    alone = generate(model, params, [prompts[1]], max_new_tokens=8, sampling=s, seed=[12])
    assert both.tokens[1] == alone.tokens[0]
    other = generate(model, params, [prompts[1]], max_new_tokens=8, sampling=s, seed=[13])
    assert other.tokens[0] != alone.tokens[0]


def test_same_bucket_does_not_recompile():
    model, params = small_model("llama")
    generate(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=5)
    fn = decode.program(model)
    n = fn._cache_size()
    generate(model, params, [[7, 8, 9, 10, 11, 12], [13]], max_new_tokens=5)  # other lengths, same (2, 16) bucket
    generate(model, params, [[7, 8, 9], [13], [1]], max_new_tokens=5)  # 3 rows -> batch bucket 4: a new shape
    assert fn._cache_size() == n + 1


def test_stop_tokens_and_sequences():
    model, params = small_model("llama")
    prompt = [9, 1, 2, 60, 33]
    ref = generate(model, params, [prompt], max_new_tokens=10).tokens[0]
    eos = ref[4]
    first = ref.index(eos)
    out = generate(model, params, [prompt, [5, 6]], max_new_tokens=10, eos_id=eos)
    assert out.tokens[0] == ref[:first] and out.finish_reasons[0] == "stop"
    seq = ref[5:7]
    out = generate(model, params, [prompt], max_new_tokens=10, stop=[seq])
    cut = next(i for i in range(len(ref)) if ref[i:i + 2] == seq)
    assert out.tokens[0] == ref[:cut] and out.finish_reasons == ["stop"]


def test_stream_matches_generate():
    model, params = small_model("llama")
    prompts = [[5, 17, 3], [9, 1, 2, 60, 33]]
    s = Sampling(temperature=0.8, top_k=20)
    ref = generate(model, params, prompts, max_new_tokens=6, sampling=s, seed=3)
    steps = np.stack(list(stream(model, params, prompts, max_new_tokens=6, sampling=s, seed=3)), 1)
    assert steps.tolist() == ref.tokens


def test_cache_full_stops_the_row():
    model, params = small_model("llama")
    prompt = [9, 1, 2, 60, 33]
    ref = generate(model, params, [prompt], max_new_tokens=10).tokens[0]
    # 8 slots: positions 5, 6, 7 can still be written, so 4 tokens come out (the 4th is never fed back)
    out = generate(model, params, [prompt], max_new_tokens=10, max_len=8)
    assert out.tokens[0] == ref[:4] and out.finish_reasons == ["length"]


def test_logprobs_are_the_models():
    model, params = small_model("llama")
    prompt = [9, 1, 2, 60, 33]
    out = generate(model, params, [prompt], max_new_tokens=4, return_logprobs=True,
                   sampling=Sampling(temperature=1.0), seed=5)
    seq = np.array([prompt + out.tokens[0]], np.int32)
    logp = jax.nn.log_softmax(full_forward(model)(params, jnp.asarray(seq))[0], -1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out.tokens[0])]
    np.testing.assert_allclose(out.logprobs[0], want, atol=1e-4)


def test_int8_kv_cache_quality():
    """int8 K/V (per-token-per-head scales) stays close to the float cache: same greedy tokens on most steps."""
    model, params = small_model("llama")
    prompts = [list(range(3, 3 + n)) for n in (4, 9)]
    f = generate(model, params, prompts, max_new_tokens=12, return_logprobs=True)
    q = generate(model, params, prompts, max_new_tokens=12, return_logprobs=True, quantize_kv=True)
    agree = np.mean([a == b for fa, qa in zip(f.tokens, q.tokens) for a, b in zip(fa, qa)])
    assert agree >= 0.75, (f.tokens, q.tokens)
    # the first token depends only on prefill (no cache read of old entries): log-prob within a small tolerance
    np.testing.assert_allclose([r[0] for r in q.logprobs], [r[0] for r in f.logprobs], atol=0.05)


def test_prompt_errors():
    model, params = small_model("llama")
    with pytest.raises(PromptError, match="empty"):
        generate(model, params, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        generate(model, params, [[1, 97]], max_new_tokens=2)
    with pytest.raises(PromptError, match="cache holds at most 4"):
        generate(model, params, [[1, 2, 3, 4, 5]], max_new_tokens=2, max_len=4)


def test_padded_array_prompts_with_lengths():
    model, params = small_model("llama")
    arr = np.array([[5, 17, 3, 0, 0], [9, 1, 2, 60, 33]])
    a = generate(model, params, arr, lengths=[3, 5], max_new_tokens=4)
    b = generate(model, params, [[5, 17, 3], [9, 1, 2, 60, 33]], max_new_tokens=4)
    assert a.tokens == b.tokens


def test_for_decoding_layout_gives_the_same_tokens():
    model, params = small_model("llama")
    fast_model, fast_params = generation.for_decoding(model, params)
    assert not fast_model.cfg.scan_layers and "layers_1" in fast_params
    prompts = [[5, 17, 3], [9, 1, 2, 60, 33, 7, 8]]
    assert generate(fast_model, fast_params, prompts, max_new_tokens=8).tokens == \
        generate(model, params, prompts, max_new_tokens=8).tokens


def test_decode_programs_unroll_a_scanned_stack_themselves():
    """generate on a scanned model runs the unrolled layout inside its program (no weight copy per step), built once
    per config; the program itself is cached per model object (one jit cache for generate, stream, beam, spec)."""
    model, params = small_model("llama")
    assert model.cfg.scan_layers
    m1, p1 = decode.decoding_layout(model, params)
    m2, _ = decode.decoding_layout(model, params)
    assert m1 is m2 and not m1.cfg.scan_layers and "layers_1" in p1
    assert decode.decoding_layout(m1, p1)[0] is m1  # already unrolled: unchanged
    assert decode.program(model) is decode.program(model)
    traced = jax.make_jaxpr(lambda p: decode.step_fn(*decode.decoding_layout(model, p))(
        jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), decode.KVCache.init(m1.cfg, 1, 4)))(params)
    assert "scan" not in str(traced)  # the decode step has no layer loop left


def test_cache_takes_the_models_dtype_and_is_asked_whether_it_is_full():
    model, params = small_model("llama", ("dtype=bfloat16",))
    step = decode.step_fn(model, params)
    _, cache = decode.prefill_cache(step, model.cfg, jnp.ones((1, 4), jnp.int32), jnp.array([4]), max_len=6)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves((cache.k, cache.v)))
    np.testing.assert_array_equal(cache.is_full(jnp.array([5])), [False])
    np.testing.assert_array_equal(cache.is_full(jnp.array([6])), [True])
    wmodel, wparams = small_model("window")
    _, ring = decode.prefill_cache(decode.step_fn(wmodel, wparams), wmodel.cfg, jnp.ones((1, 4), jnp.int32),
                                       jnp.array([4]), max_len=64)
    assert ring.ring and ring.slots == 4 and not bool(ring.is_full(jnp.array([1000]))[0])
