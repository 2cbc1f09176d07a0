"""The HTTP layer in-process (FastAPI TestClient under the official openai client) over a contract-keeping fake engine
(fake_engine.py: a bigram model with closed-form references). The real engine behind a real `jaxtx serve` process is
tested in test_serve.py; these tests pin down the OpenAI shapes, validation and the event hand-off quickly."""
import json
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from jaxtx.infer.server.app import ServeConfig, create_app
from jaxtx.infer.server.metrics import parse
from jaxtx.infer.server.tokenizer import load_hf_tokenizer
from fake_engine import FakeEngine, log_softmax

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "server" / "llama_chat"
V = 320
NAME = "tiny-chat"


def _until(cond, timeout=5.0):
    """Aborts reach the engine at its next step, after the response went out."""
    import time
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tok():
    return load_hf_tokenizer(FIXTURE)


def _serve(tok, engine=None, **cfg):
    engine = engine or FakeEngine(V)
    app = create_app(engine, tok, ServeConfig(model_name=NAME, max_model_len=256, model_vocab=V, **cfg))
    return engine, TestClient(app)


@pytest.fixture(scope="module")
def served(tok):
    engine, http = _serve(tok)
    with http:
        yield engine, http, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http,
                                          max_retries=0)


def test_models_health_metrics(served):
    engine, http, client = served
    assert [m.id for m in client.models.list().data] == [NAME]
    assert http.get("/health").json() == {"status": "ok"}
    m = parse(http.get("/metrics").text)
    assert m["jaxtx_kv_pages_total"] == 256 and "jaxtx_requests_running" in m


def test_completion_greedy_and_stream(served, tok):
    engine, _, client = served
    prompt = "Hello, world!"
    ids = tok.encode(prompt)
    want = engine.reference_greedy(ids, 12, eos=tok.eos_ids)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == tok.decode(want)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("length" if len(want) == 12 else "stop")
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
    assert all(c.id == chunks[0].id for c in chunks) and chunks[-2].choices[0].finish_reason is not None
    # token-id prompts, a batch of prompts
    r2 = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=5, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].text == tok.decode(engine.reference_greedy(ids, 5, eos=tok.eos_ids))


def test_chat_template_role_chunk_and_seed(served, tok):
    engine, _, client = served
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    prompt = tok.encode("<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert engine.seen_prompts[-1] == prompt and r.usage.prompt_tokens == len(prompt)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant" and stream[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    a = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=1.0, seed=7, n=2)
    b = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # choice j samples with seed + j


def test_stop_string_truncates_and_aborts(served, tok):
    engine, _, client = served
    full = client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    for stream in (False, True):
        n_aborted = len(engine.aborted)
        if stream:
            chunks = list(client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0,
                                                    stop=[stop], stream=True))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            c = client.completions.create(model=NAME, prompt="Hello", max_tokens=30, temperature=0, stop=stop)
            text, reason = c.choices[0].text, c.choices[0].finish_reason
        assert text == full[:full.find(stop)] and reason == "stop"
        _until(lambda: len(engine.aborted) == n_aborted + 1)  # the engine request was stopped, its pages freed


def test_logprobs_and_echo(served, tok):
    engine, _, client = served
    ids = tok.encode("Hello, world!")
    r = client.completions.create(model=NAME, prompt="Hello, world!", max_tokens=4, temperature=0, logprobs=3,
                                  echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Hello, world!")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 4
    for i in range(1, len(ids)):  # echo: the model's own scoring of the prompt
        assert lp.token_logprobs[i] == pytest.approx(log_softmax(engine.logits(ids[i - 1]))[ids[i]], abs=1e-6)
    gen = lp.top_logprobs[len(ids):]
    assert all(len(t) == 3 for t in gen) and lp.text_offset[0] == 0
    score = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert score.usage.completion_tokens == 0 and len(score.choices[0].logprobs.tokens) == len(ids)
    assert score.choices[0].text == tok.decode(ids)
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-9 for t in content)  # greedy: chosen is the top one
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace").startswith(
        c.choices[0].message.content[:1])


def test_json_schema_output_validates(served):
    _, _, client = served
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "json"}], max_tokens=120, temperature=temperature,
            seed=3, n=2, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        for ch in r.choices:
            jsonschema.validate(json.loads(ch.message.content), schema)
            assert ch.finish_reason == "stop"


MALFORMED = [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", {"model": NAME}, 400),  # no prompt
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": -1}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "n": 0}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "temperature": 5}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": [], "max_tokens": 1}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": [5, 999], "max_tokens": 1}, 400),  # id outside V
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1000}, 400),  # too long
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 50}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "stop": 3}, 400),
    ("POST", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404),
    ("POST", "/v1/completions", [1, 2], 400),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"content": "hi"}]}, 400),  # no role
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "xml"}}, 400),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                      "top_logprobs": 3}, 400),  # without logprobs
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                      "logit_bias": {"5": 3}}, 400),
    # past the 20 the real-server test sends
    ("POST", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                      "chat_template_kwargs": {"messages": []}}, 400),
    ("POST", "/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
                                     b'"temperature": NaN}', 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400),  # 0 only with echo
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "suffix": "y"}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"-5": -100}}, 400),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400),
]


@pytest.mark.parametrize("method,path,body,status", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_requests_get_4xx(served, method, path, body, status):
    _, http, _ = served
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = http.request(method, path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert http.get("/health").status_code == 200


def test_error_messages_name_the_field(served):
    _, http, client = served
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": -1}).json()["error"]
    assert r["param"] == "max_tokens" and "max_tokens" in r["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="x", max_tokens=300)


def test_api_key_and_queue_full(tok):
    _, http = _serve(tok, api_key="sk-right")
    with http:
        good = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-right", http_client=http, max_retries=0)
        bad = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-wrong", http_client=http, max_retries=0)
        assert good.models.list().data[0].id == NAME
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=NAME, prompt="x", max_tokens=1)
        assert http.get("/health").status_code == 200  # health needs no key
    engine, http = _serve(tok, FakeEngine(V, hold=True), max_queue=2)
    with http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:  # 503: two choices fill the queue, a third cannot fit
            client.completions.create(model=NAME, prompt="x", max_tokens=1, n=3)
        assert e.value.status_code == 503


def test_no_chat_template_is_a_400(tok):
    import copy
    t = copy.copy(tok)
    t.chat_template = None
    _, http = _serve(t)
    with http:
        r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_one_finish_chunk_per_choice_when_events_outrun_a_stop(tok):
    """A fast engine (4 tokens per event, no step time) queues events past a stop string before the abort lands:
    each choice still ends exactly once."""
    _, http = _serve(tok, FakeEngine(V, tokens_per_step=4, step_s=0.0))
    with http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        full = client.completions.create(model=NAME, prompt="Hello", max_tokens=40, temperature=0).choices[0].text
        chunks = list(client.completions.create(model=NAME, prompt="Hello", max_tokens=40, temperature=0,
                                                stop=[full[4:6]], stream=True, n=2))
        ends = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
        assert sorted(ends) == [0, 1]
        for i in (0, 1):
            assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == full[:full.find(full[4:6])]


def test_random_field_values_never_500(served):
    """Seeded fuzz: each known field set to a value of a random type; every answer is < 500 and well-formed."""
    _, http, _ = served
    rng = np.random.default_rng(0)
    values = [None, True, -1, 0, 3, 10 ** 12, -2.5, 0.5, "", "x", "\u00e9\U0001F600", [], [1, 2], ["a"], [[1]],
              {}, {"type": "json_object"}, {"a": 1}]
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "logprobs",
              "echo", "stream", "logit_bias", "response_format", "presence_penalty", "repetition_penalty", "user",
              "stream_options", "best_of", "messages", "top_logprobs", "max_completion_tokens",
              "chat_template_kwargs"]
    for i in range(150):
        chat = i % 2 == 1
        body = {"model": NAME, "max_tokens": 3}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
        for f in rng.choice(fields, size=int(rng.integers(1, 4)), replace=False):
            body[str(f)] = values[int(rng.integers(len(values)))]
        r = http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"], body
    assert http.get("/health").status_code == 200
