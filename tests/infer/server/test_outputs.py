"""A choice assembled from engine events: stop strings across token boundaries, held-back partial matches, EOS
trimming, and Prometheus text."""
from pathlib import Path

import pytest

from fake_engine import Event
from jaxtx.infer.server.metrics import Histogram, Metrics, parse
from jaxtx.infer.server.outputs import Choice
from jaxtx.infer.server.tokenizer import load_hf_tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "server" / "llama_chat"


@pytest.fixture(scope="module")
def tok():
    return load_hf_tokenizer(FIXTURE)


def _feed(tok, text, stop, eos=None, reason="length"):
    ids = tok.encode(text, add_special_tokens=False)
    c = Choice(0, "r", tok, tok.encode("Q:"), stop=stop)
    out = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1 and eos is None
        out.append(c.add(Event("r", [t], finished=last, finish_reason=reason if last else None)))
        if c.finished:
            break
    if eos is not None and not c.finished:
        out.append(c.add(Event("r", [eos], finished=True, finish_reason="stop", stop_len=1)))
    return out, c


@pytest.mark.parametrize("text,stop,want", [
    ("Hello, world! How are you?", ["world"], "Hello, "),
    ("Hello, world! How are you?", ["xyz", "! H"], "Hello, world"),
    ("Hello, world! How are you?", ["you?!"], "Hello, world! How are you?"),  # partial match at the end: released
    ("Caf\u00e9 \u65e5\u672c\u8a9e ok", ["\u672c"], "Caf\u00e9 \u65e5"),  # a stop inside multi-byte characters
])
def test_stop_strings(tok, text, stop, want):
    out, c = _feed(tok, text, stop)
    assert "".join(out) == want == c.text
    assert c.finish_reason == ("stop" if want != text else "length")
    for i in range(len(out)):  # nothing released is ever taken back: each prefix is a prefix of the answer
        assert want.startswith("".join(out[: i + 1]))


def test_eos_is_not_part_of_the_answer(tok):
    out, c = _feed(tok, "Hi there", None, eos=3)
    assert "".join(out) == "Hi there" and c.finish_reason == "stop"
    assert 3 not in c.token_ids and len(c.token_ids) == len(tok.encode("Hi there", add_special_tokens=False))


def test_metrics_text():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    m = Metrics()
    m.latency["chat"] = h
    m.request_done("chat", 400)
    got = parse(m.render({"pages_used": 3, "pages_total": 10, "running": 1, "preemptions": 2, "note": "x"}))
    assert got["jaxtx_engine_preemptions"] == 2 and not any("note" in k for k in got)
    assert got["jaxtx_kv_pages_used"] == 3 and got["jaxtx_kv_pages_total"] == 10
    assert got['jaxtx_request_latency_seconds_bucket{endpoint="chat",le="0.1"}'] == 1
    assert got['jaxtx_request_latency_seconds_bucket{endpoint="chat",le="1.0"}'] == 3  # cumulative
    assert got['jaxtx_request_latency_seconds_bucket{endpoint="chat",le="+Inf"}'] == 4
    assert got['jaxtx_request_latency_seconds_sum{endpoint="chat"}'] == pytest.approx(4.05)
    assert got['jaxtx_http_requests_total{endpoint="chat",status="400"}'] == 1
