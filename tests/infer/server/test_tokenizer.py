"""Server tokenizers: special tokens decided by the tokenizer's own settings, byte-exact pieces, and streaming
detokenization that never splits a multi-byte character (against a full decode as the reference)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxtx.infer.server import tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "server" / "llama_chat"
TEXTS = ["Hello, world! How are you today?",
         "Caf\u00e9 cr\u00e8me \u65e5\u672c\u8a9e\u306e\u6587 \U0001F600\U0001F680 ok",
         '{"name": "Alice", "tags": ["a"]}\n  indented\tand tabs', "\u00fc\u00fc\u00fc\U0001F600x\U0001F600"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_hf_tokenizer(FIXTURE)


def test_hf_special_tokens_follow_the_tokenizer(tok):
    ids = tok.encode("Hello")
    assert ids[0] == 0 and 0 not in tok.encode("Hello", add_special_tokens=False)  # post-processor adds <s>
    assert ids[1:] == tok.encode("Hello", add_special_tokens=False)
    assert tok.eos_ids == (3, 1)  # generation_config.json wins over config.json's 3
    assert tok.template_tokens["bos_token"] == "<s>" and tok.template_tokens["eos_token"] == "<|im_end|>"
    assert tok.chat_template is not None and "im_start" in tok.chat_template
    assert tok.vocab_size == 300


@pytest.mark.parametrize("add_bos,add_eos", [(False, False), (True, True), (False, True)])
def test_tokenizer_config_flags_override_post_processor(tmp_path, add_bos, add_eos):
    for f in FIXTURE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    conf.update(add_bos_token=add_bos, add_eos_token=add_eos, eos_token="</s>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    tok = tokenizer.load_hf_tokenizer(tmp_path)
    body = tok.encode("Hello", add_special_tokens=False)
    assert tok.encode("Hello") == [0] * add_bos + body + [1] * add_eos


def test_chat_template_sources(tmp_path):
    for f in FIXTURE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    conf["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    assert tokenizer.load_hf_tokenizer(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins, as in transformers
    assert tokenizer.load_hf_tokenizer(tmp_path).chat_template == "J"
    conf["chat_template"] = [{"name": "tool_use", "template": "T"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(tokenizer.TokenizerError, match="without one named 'default'"):
        tokenizer.load_hf_tokenizer(tmp_path)


def test_token_bytes_concatenate_to_the_text(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
        assert tok.decode(ids) == text
    assert tok.token_bytes(0) == b"<s>" and tok.token_bytes(310) == b""  # padded-vocab id: no piece
    pieces = [tok.token_str(i) for i in tok.encode("\u65e5", add_special_tokens=False)]
    assert all(p.startswith("bytes:\\x") for p in pieces)  # a CJK char split over byte tokens


def _check_stream(tok, ids, prompt=(), chunks=None):
    dec = tokenizer.IncrementalDecoder(tok, prompt)
    rng = np.random.default_rng(len(ids))
    out, i = [], 0
    while i < len(ids):
        k = int(rng.integers(1, 4)) if chunks is None else chunks
        delta = dec.push(ids[i:i + k])
        assert "\ufffd" not in delta, (ids[:i + k], delta)
        out.append(delta)
        i += k
    out.append(dec.flush())
    return "".join(out)


@pytest.mark.parametrize("chunks", [1, None])
def test_incremental_decode_equals_full_decode(tok, chunks):
    prompt = tok.encode("<|im_start|>user\n")
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False) + [3]  # + a special token (skipped)
        assert _check_stream(tok, ids, prompt, chunks) == tok.decode(ids) == text


def test_incremental_decode_flushes_an_incomplete_character(tok):
    ids = tok.encode("ab\U0001F600", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    dec = tokenizer.IncrementalDecoder(tok)
    assert dec.push(ids) == "ab"  # released before the emoji completes
    full = tok.decode(ids)
    assert full.endswith("\ufffd")
    assert dec.flush() == "\ufffd"  # as a full decode shows it


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "m"), vocab_size=315, byte_fallback=True,
                                   character_coverage=0.99, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   minloglevel=2)
    return d / "m.model"


def test_sentencepiece_run_tokenizer(sp_model):
    tok = tokenizer.load_run_tokenizer(sp_model)
    assert tok.encode("the fox") == tok.encode("the fox", add_special_tokens=False) and tok.eos_ids == (3,)
    assert tokenizer.load_run_tokenizer(sp_model, prefix_ids=[2]).encode("the fox")[0] == 2  # the recorded layout
    for text in TEXTS[:2] + ["the quick brown fox"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        prompt = tok.encode("x")
        # the continuation of the prompt, leading spaces included (a decode of ids alone drops the first one)
        want = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
        assert want.strip() == text
        assert _check_stream(tok, ids, prompt) == want
        # tokens without text (past the tokenizer, control pieces) before a piece that starts with a space
        gaps = [tok.vocab_size + 3, 3] + ids
        assert _check_stream(tok, gaps, prompt, chunks=1) == tok.decode(prompt + gaps)[len(tok.decode(prompt)):]
        assert b"".join(tok.token_bytes(i) for i in ids).lstrip(b" ") == text.encode("utf-8")


def test_sentencepiece_structured_output(sp_model):
    """llguidance over a sentencepiece vocabulary: random walks under a schema mask parse and validate."""
    import jsonschema

    from jaxtx.infer.server import structured
    tok = tokenizer.load_run_tokenizer(sp_model)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5}},
              "required": ["a", "b"], "additionalProperties": False}
    compiler = structured.GuideCompiler(tok, tok.vocab_size + 5)  # a padded model vocab
    grammar = structured.json_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    rng = np.random.default_rng(0)
    for _ in range(10):
        guide, ids = structured.Guide(compiler, grammar), []
        while True:
            allowed = structured.unpack(guide(ids), tok.vocab_size + 5)
            assert not allowed[tok.vocab_size:].any()
            t = int(rng.choice(np.nonzero(allowed)[0]))
            if t in tok.eos_ids:
                break
            ids.append(t)
            assert len(ids) < 300
        jsonschema.validate(json.loads(tok.decode(ids)), schema)
