"""Data pipeline: lossless tokenizer, exact packing, deterministic and resumable iteration, clear input errors."""
import json

import numpy as np
import pytest
from train_helpers import run_cfg

from jaxtx.config import ConfigError
from jaxtx.train import data
from jaxtx.train import packing
from jaxtx.train.tokenizer import EOS, PAD, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([p.read_text() for p in data.stdlib_files()[:40]], 512)


def test_tokenizer_round_trip_is_lossless(tok):
    texts = ["  def f(x):\n\treturn x  # trailing  \n\n", "naïve café ☃ 🐍 \x00\r\n", "", "    \n    "]
    for s in texts:
        assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size <= 512 and tok.sentinel(0) != tok.sentinel(99) != tok.mask_id


def test_pack_documents_segments_and_padding():
    rows = packing.pack_documents([[5, 6, 7], [8] * 6, [9, 9]], 8)  # with EOS: 4 + 7 + 3 = 14 -> 2 rows, 2 pads
    np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, EOS, 8, 8, 8, 8], [8, 8, EOS, 9, 9, EOS, PAD, PAD]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 2, 2, 2, 0, 0]])


def test_prompt_response_rows_mask():
    rows = packing.prompt_response_rows([([1, 2, 3], [4, 5])], 8)
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1] * 6 + [0, 0]])


def test_iterator_is_deterministic_reshuffles_and_resumes():
    cfg = run_cfg(["train.seed=3"])
    rows = {"tokens": np.arange(40, dtype=np.int32).reshape(10, 4), "segment_ids": np.ones((10, 4), np.int32)}
    a = data.train_iterator(rows, cfg, 5)
    seq = [next(a)["tokens"][:, 0] for _ in range(4)]  # 2 epochs
    assert sorted(np.concatenate(seq[:2]).tolist()) == list(range(0, 40, 4))  # epoch 1 is a permutation
    assert not np.array_equal(np.concatenate(seq[:2]), np.concatenate(seq[2:]))  # epoch 2 is reshuffled
    b = data.train_iterator(rows, cfg, 5)
    next(b)
    state = json.loads(json.dumps(b.get_state()))  # JSON-able: it goes into the checkpoint's meta
    c = data.train_iterator(rows, cfg, 5)
    c.set_state(state)
    for want in seq[1:]:
        np.testing.assert_array_equal(next(c)["tokens"][:, 0], want)
    other = data.train_iterator(rows, run_cfg(["train.seed=4"]), 5)
    assert not np.array_equal(next(other)["tokens"][:, 0], seq[0])


def test_split_is_fixed_and_disjoint():
    docs = [f"doc{i}" for i in range(100)]
    tr, ev = data.split(docs, 0.1)
    assert ev == [f"doc{i}" for i in range(9, 100, 10)] and not set(tr) & set(ev) and len(tr) + len(ev) == 100


def test_stdlib_corpus_is_sorted_python_without_tests():
    files = data.stdlib_files()
    assert len(files) > 200 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts and "test" not in f.parts for f in files)


def test_unigram_entropy_closed_form():
    t = np.array([[5, 5, 6, 7, PAD]])
    p = np.array([0.5, 0.25, 0.25])
    assert data.unigram_entropy(t) == pytest.approx(float(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------------------------ input errors
def test_missing_files(tmp_path):
    cfg = run_cfg(["data.source=text", f"data.path={tmp_path}/nothing*.txt"])
    with pytest.raises(ConfigError, match="no file matches"):
        data.read_documents(cfg)


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        data.read_documents(run_cfg(["data.source=text", f"data.path={tmp_path}/*.txt"]))


def test_jsonl_missing_field_names_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:2.*\['text'\]"):
        data.read_documents(run_cfg(["data.source=jsonl", f"data.path={f}"]))


def test_tokenizer_larger_than_model_vocab(tmp_path, tok):
    tok.save(tmp_path / "t.model")
    cfg = run_cfg([f"data.tokenizer={tmp_path}/t.model", "model.vocab_size=400"])
    with pytest.raises(ConfigError, match="model.vocab_size=400"):
        data.get_tokenizer(cfg, cfg.model_config(), [], None)


def test_jsonl_sft_rows(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"q{i}: ", "response": f"a{i}"}) for i in range(4)))
    cfg = run_cfg(["data.source=jsonl", f"data.path={f}", "train.objective=sft", "train.seq_len=16"])
    rows = data.build_rows(data.read_documents(cfg), tok, cfg)
    for i in range(4):
        resp = rows["tokens"][i][rows["loss_mask"][i] > 0]
        assert tok.decode(resp) == f"a{i}" and resp[-1] == EOS
