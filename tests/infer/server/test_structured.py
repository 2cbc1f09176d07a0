"""Structured output masks: every output of a random-token walk under the mask (the worst a random-weight model can
do) parses, validates against its schema (jsonschema as the reference) and is compact JSON."""
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from jaxtx.infer.server import structured
from jaxtx.infer.server.tokenizer import load_hf_tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "server" / "llama_chat"
V = 320  # the fixture model's vocab; the tokenizer has 300 pieces
EOS = (3, 1)

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c\u00e9"]}, "maxItems": 3},
        "ok": {"type": "boolean"}}, "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                  "required": ["x", "y"], "additionalProperties": False},
        "kind": {"enum": ["circle", "square"]}, "note": {"type": ["string", "null"], "maxLength": 6}},
        "required": ["point", "kind", "note"], "additionalProperties": False},
    "list": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
             "maxItems": 4},
}


@pytest.fixture(scope="module")
def tok():
    return load_hf_tokenizer(FIXTURE)


@pytest.fixture(scope="module")
def compiler(tok):
    return structured.GuideCompiler(tok, V)


def _compact(text: str) -> bool:
    """No whitespace outside strings."""
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in " \t\n\r":
            return False
    return True


def _walk(compiler, grammar, rng, max_steps=600):
    guide = structured.Guide(compiler, grammar)
    ids = []
    for _ in range(max_steps):
        allowed = structured.unpack(guide(ids), V)
        assert not allowed[300:].any(), "ids without a tokenizer piece must never be allowed"
        choices = np.nonzero(allowed)[0]
        assert len(choices), "the mask allows nothing"
        t = int(rng.choice(choices))
        if t in EOS:
            return ids, True
        ids.append(t)
    return ids, False


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_validate(tok, compiler, name):
    schema = SCHEMAS[name]
    grammar = structured.json_grammar({"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
    compiler.check(grammar)
    rng = np.random.default_rng(0)
    for _ in range(25):
        ids, ended = _walk(compiler, grammar, rng)
        text = tok.decode(ids)
        assert ended, f"schema-bounded output did not end: {text!r}"
        jsonschema.validate(json.loads(text), schema)
        assert _compact(text), text


def test_json_object_walks(tok, compiler):
    grammar = structured.json_grammar({"type": "json_object"})
    rng = np.random.default_rng(1)
    ended_n = 0
    for _ in range(20):
        ids, ended = _walk(compiler, grammar, rng, max_steps=800)
        if ended:  # an unbounded object may legitimately run to the token limit
            ended_n += 1
            text = tok.decode(ids)
            assert isinstance(json.loads(text), dict) and _compact(text), text
    assert ended_n >= 10


def test_completed_grammar_allows_only_eos(tok, compiler):
    grammar = structured.json_grammar({"type": "json_schema",
                                       "json_schema": {"name": "b", "schema": {"type": "boolean"}}})
    guide = structured.Guide(compiler, grammar)
    ids = tok.encode("true", add_special_tokens=False)
    for i in range(len(ids)):
        assert structured.unpack(guide(ids[:i]), V)[ids[i]]
    assert set(np.nonzero(structured.unpack(guide(ids), V))[0]) == set(EOS)


def test_grammar_errors_and_text(compiler):
    assert structured.json_grammar(None) is None and structured.json_grammar({"type": "text"}) is None
    with pytest.raises(structured.GrammarError, match="response_format.type='xml'"):
        structured.json_grammar({"type": "xml"})
    with pytest.raises(structured.GrammarError):
        compiler.check(structured.json_grammar({"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}))


def test_pack_unpack_combine():
    rng = np.random.default_rng(0)
    a, b = rng.random(V) < 0.5, rng.random(V) < 0.5
    packed = structured.pack(a)
    assert (structured.unpack(packed, V) == a).all() and packed.shape == (10,) and packed.dtype == np.int32
    both = structured.combine(lambda ids: structured.pack(a), None, lambda ids: structured.pack(b))
    assert (structured.unpack(both([]), V) == (a & b)).all()
    assert structured.combine(None, None) is None
