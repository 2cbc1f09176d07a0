"""`jaxtx serve` for real: a uvicorn subprocess on 127.0.0.1 (started once for the module) serving the fixture
checkpoint through the engine, driven by the official openai client (max_retries=0, so no retry hides a 5xx).

References: greedy text equals jaxtx.infer.generate (the static path); logprobs and echo prompt logprobs equal the
model's own log_softmax of one full forward; 64 concurrent streams each equal an offline engine's output for the
same request and seed; structured outputs validate with jsonschema.
"""
import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import serve_process

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "server" / "llama_chat"
NAME = "tiny-chat"
KEY = "sk-test-key"
EOS = [3, 1]
# small enough to compile fast (token buckets 16 and 32, one decode-loop bucket), big enough to queue: 64 streams
# share 8 rows and prompts are prefilled in chunks
ENGINE_ARGS = dict(max_seqs=8, page_size=16, num_pages=96, max_tokens_per_step=32, decode_steps=4)


@pytest.fixture(scope="module")
def server():
    args = ["--hf", str(FIXTURE), "--served-model-name", NAME, "--api-key", KEY, "--grace", "5"] + \
        [x for k, v in ENGINE_ARGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    with serve_process.serve(args) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref():
    """The fixture model in this process: tokenizer, model, params (decoding layout)."""
    from jaxtx import hf
    from jaxtx.infer.generation import for_decoding
    from jaxtx.infer.server.tokenizer import load_hf_tokenizer
    model, params = hf.load(FIXTURE)
    model, params = for_decoding(model, params)
    return load_hf_tokenizer(FIXTURE), model, params


def _log_softmax_rows(model, params, ids):
    """[T, V] float64 log-probabilities of the token after each position, from one full forward."""
    import jax.numpy as jnp
    logits = np.asarray(model.apply({"params": params}, jnp.asarray([ids], jnp.int32))[0], np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)


def _metrics(base):
    from jaxtx.infer.server.metrics import parse
    return parse(httpx.get(base + "/metrics", timeout=10).text)


def _until(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.1)


PROMPTS = ["Hello, world!", "The quick brown fox", "def main():\n    print(", '{"name": "Alice", "age":',
           "Caf\u00e9 \u65e5\u672c", "You are a helpful assistant. Answer the question briefly and accurately.",
           "1 2 3", "Paris is the capital of"]


def test_greedy_completion_equals_generate(client, ref):
    from jaxtx.infer import generate
    tok, model, params = ref
    for prompt in PROMPTS[:3]:
        ids = tok.encode(prompt)
        want = generate(model, params, [ids], max_new_tokens=24, eos_id=EOS).tokens[0]
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == tok.decode(want)
        assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(ids)
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_logprobs_and_echo_equal_model_scoring(client, ref):
    tok, model, params = ref
    prompt = PROMPTS[1]
    ids = tok.encode(prompt)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and lp.token_logprobs[0] is None
    from jaxtx.infer import generate
    gen = generate(model, params, [ids], max_new_tokens=6, eos_id=EOS).tokens[0]  # the greedy tokens served
    assert r.choices[0].text == prompt + tok.decode(gen)
    full = ids + gen
    rows = _log_softmax_rows(model, params, full)
    want = [rows[i - 1, full[i]] for i in range(1, len(full))]
    np.testing.assert_allclose(lp.token_logprobs[1:len(full)], want, atol=2e-4)
    for top, lps in zip(lp.top_logprobs[len(ids):], rows[len(ids) - 1:]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lps.max(), abs=2e-4)
    # lm-eval's loglikelihood request: echo, max_tokens=0
    score = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert score.usage.completion_tokens == 0
    np.testing.assert_allclose(score.choices[0].logprobs.token_logprobs[1:], want[:len(ids) - 1], atol=2e-4)


def test_chat_stream_n_stop_seed(client, ref):
    tok, model, params = ref
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=20, temperature=0,
                                       logprobs=True, top_logprobs=2)
    text = r.choices[0].message.content
    stream = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert stream[-1].choices[0].finish_reason == r.choices[0].finish_reason
    for t in r.choices[0].logprobs.content:  # greedy: every chosen token is the most likely one
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
    if len(text) > 6:
        stop = text[3:6]
        s = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0, stop=[stop])
        assert s.choices[0].message.content == text[:text.find(stop)] and s.choices[0].finish_reason == "stop"
    kw = dict(model=NAME, messages=msgs, max_tokens=16, temperature=1.0, top_p=0.95, seed=1234, n=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def test_json_schema_outputs_validate(client):
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["big", "old", "new"]}, "maxItems": 3}},
        "required": ["city", "population"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "A city as JSON."}], max_tokens=120, temperature=1.0,
        seed=5, n=4, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                                             "strict": True}})
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
        assert c.finish_reason == "stop" and " " not in c.message.content.replace('" "', "").split('"')[0]


def test_errors_map_to_client_exceptions(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=-1)
    bad = openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == [NAME]


def test_malformed_requests_leave_server_healthy(server):
    from test_app import MALFORMED
    base = server[1]
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = MALFORMED[:20]  # bad JSON, wrong types, negative max_tokens, n=0, unknown model, empty messages, ...
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        for method, path, body, status in cases:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = http.request(method, path, **kw)
            assert 400 <= r.status_code < 500 and r.status_code == status, (body, r.status_code, r.text)
            assert "message" in r.json()["error"]
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"model": NAME, "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_64_concurrent_streams_equal_offline_engine(server, ref):
    from jaxtx.infer.engine import Engine, EngineConfig
    from jaxtx.sampling import Sampling
    tok, model, params = ref
    base = server[1]
    reqs = []
    for i in range(64):
        prompt = PROMPTS[i % len(PROMPTS)] + " " * (i % 3)
        sampled = i % 2 == 1
        reqs.append(dict(prompt=prompt, max_tokens=4 + (i * 7) % 37, temperature=0.8 if sampled else 0.0,
                         top_p=0.9 if sampled else 1.0, seed=i))

    async def one(client, r):
        stream = await client.completions.create(model=NAME, stream=True, **r)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run_all():
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, r) for r in reqs))
        finally:
            await client.close()

    got = asyncio.run(run_all())
    engine = Engine(model, params, EngineConfig(**ENGINE_ARGS, max_model_len=256, prompt_logprobs=True))
    rid = {}
    for i, r in enumerate(reqs):
        rid[engine.add_request(tok.encode(r["prompt"]), max_new_tokens=r["max_tokens"], eos_id=EOS, seed=r["seed"],
                               sampling=Sampling(temperature=r["temperature"], top_p=r["top_p"]))] = i
    toks, done = {i: [] for i in range(64)}, {}
    while len(done) < 64:
        for ev in engine.step():
            toks[rid[ev.request_id]] += ev.token_ids
            if ev.finished:
                done[rid[ev.request_id]] = ev
    for i in range(64):
        t = toks[i][:len(toks[i]) - done[i].stop_len]
        assert got[i] == (tok.decode(t), done[i].finish_reason), (i, reqs[i])
    _until(lambda: _metrics(base)["jaxtx_kv_pages_used"] == 0 and _metrics(base)["jaxtx_requests_running"] == 0)
    assert httpx.get(base + "/health").status_code == 200


def test_client_disconnect_aborts_and_frees_pages(server):
    base = server[1]
    before = _metrics(base)["jaxtx_generated_tokens_total"]
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True,
            "logit_bias": {"3": -100, "1": -100}}  # no EOS: only the disconnect can end it early
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert all(g.startswith("data: ") or g == "" for g in got)
    _until(lambda: _metrics(base)["jaxtx_requests_running"] == 0 and _metrics(base)["jaxtx_kv_pages_used"] == 0)
    assert _metrics(base)["jaxtx_generated_tokens_total"] - before < 200


def test_sigterm_shuts_down_cleanly(server):
    proc, base, log = server
    results = {}

    def long_request():
        try:
            c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
            results["text"] = c.completions.create(model=NAME, prompt="Hi", max_tokens=30, temperature=0)
        except Exception as e:  # an abort at shutdown is an acceptable end for an in-flight request
            results["error"] = e

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    t.join(30)
    assert results
    log.seek(0)
    assert "shut down cleanly" in log.read()
