"""Values that used to be accepted and silently trained something wrong are refused through the real CLI entry point:
exit code 2, one line naming the field (or file) and the rule, no traceback, and nothing built or compiled."""
import json

import numpy as np
import pytest
from train_helpers import TINY_MODEL, run_cfg

from jaxtx import cli
from jaxtx.config import ConfigError
from jaxtx.train import data
from jaxtx.train.config import DataConfig, load_run_config
from jaxtx.train.optim import make_optimizer

BASE = [*TINY_MODEL, "mesh.data=1", "train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.progress=false"]


def _files(tmp_path):
    """Inputs the bad-data cases point at."""
    (tmp_path / "blob.bin").write_bytes(b"PK\x03\x04 zip header then \xff\xfe binary")
    (tmp_path / "good.txt").write_text("def f(x):\n    return x\n" * 50)
    (tmp_path / "good2.txt").write_text("def g(y):\n    return y\n" * 50)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "nul.txt").write_bytes(b"text\x00\x00\x00 more")
    (tmp_path / "bad.yaml").write_text("model:\n  preset: tiny\ntrain: {steps: 3\n")
    (tmp_path / "dup.yaml").write_text("model: {preset: tiny}\noptim:\n  lr: 1.0e-3\n  lr: 1.0\n")
    (tmp_path / "section.yaml").write_text("model: {preset: tiny}\ntrain: 5\n")
    (tmp_path / "intkey.yaml").write_text("model: {preset: tiny, 1: 2}\n")
    (tmp_path / "model_bad.yaml").write_text("d_model: 64\nn_heads: [4\n")
    (tmp_path / "notok.model").write_text("not a sentencepiece model")
    (tmp_path / "empty").mkdir()


# (config, overrides, what the one-line message must contain)
CASES = [
    ("optim.lr=-0.5", None, ["optim.lr=-0.5: must be > 0"]),
    ("optim.lr=nan", None, ["optim.lr=nan: must be a finite number > 0"]),
    ("optim.lr=inf", None, ["optim.lr=inf"]),
    ("optim.b1=1.0", None, ["optim.b1=1.0: must be in [0, 1)"]),
    ("optim.b2=-0.1", None, ["optim.b2=-0.1"]),
    ("optim.eps=0", None, ["optim.eps=0.0: must be > 0"]),
    ("optim.weight_decay=-0.1", None, ["optim.weight_decay=-0.1: must be >= 0"]),
    ("optim.clip_norm=-1", None, ["optim.clip_norm=-1.0"]),
    ("optim.warmup_steps=-3", None, ["optim.warmup_steps=-3: must be >= 0"]),
    ("optim.min_lr_ratio=nan", None, ["optim.min_lr_ratio=nan"]),
    ("optim.grad_accum=0", None, ["optim.grad_accum=0: must be >= 1"]),
    ("optim.grad_accum=3", None, ["optim.grad_accum=3", "train.batch_size=2"]),
    ("optim.lr=abc", None, ["optim.lr='abc': expected float"]),
    ("model.norm_eps=nan", None, ["norm_eps=nan: must be a finite number > 0"]),
    ("model.rope_theta=-5", None, ["rope_theta=-5.0: must be > 1"]),
    ("model.dropout=1.0", None, ["dropout=1.0: must be in [0, 1)"]),
    ("model.init_std=0", None, ["init_std=0.0: must be > 0"]),
    ("model.softmax_scale=0", None, ["softmax_scale=0.0"]),
    ("train.eval_every=-1", None, ["train.eval_every=-1: must be >= 0"]),
    ("train.ckpt_every=-5", None, ["train.ckpt_every=-5: must be >= 0"]),
    ("train.seed=-1", None, ["train.seed=-1"]),
    ("train.seq_len=1", None, ["train.seq_len=1: must be >= 2"]),
    ("train.dpo_beta=nan", None, ["train.dpo_beta=nan"]),
    ("data.eval_fraction=0", None, ["data.eval_fraction=0"]),
    ("data.source=stdlib data.path=my.jsonl", None, ["data.source='stdlib' does not read data.path='my.jsonl'",
                                                      "data.source=jsonl"]),
    ("data.source=synthetic data.path=x.txt", None, ["data.source='synthetic'", "data.source=text"]),
    ("data.source=text data.path={tmp}/x.jsonl", None, ["data.source='text'", "data.source=jsonl"]),
    ("data.source=text data.path={tmp}/blob.bin", None, ["blob.bin: not UTF-8", "byte offset 21"]),
    ("data.path={tmp}/blob.bin", None, ["blob.bin: not UTF-8", "byte offset 21"]),
    ("data.path={tmp}/nul.txt", None, ["nul.txt: NUL byte at byte offset 4"]),
    ("data.path={tmp}/latin1.jsonl", None, ["latin1.jsonl:2: not UTF-8", "byte offset 28"]),
    ("data.path={tmp}/missing.txt", None, ["data.path=", "missing.txt", "no such file"]),
    ("data.path={tmp}/*.md", None, ["*.md", "no file matches"]),
    ("data.path={tmp}/empty", None, ["empty", "holds no files"]),
    ("data.path={tmp}/good*.txt data.tokenizer={tmp}/notok.model", None, ["data.tokenizer=", "not a sentencepiece"]),
    ("data.path={tmp}/good.txt train.objective=sft", None, ["train.objective='sft'", "data.source='text'"]),
    ("", "{tmp}/bad.yaml", ["bad.yaml:4:1: invalid YAML"]),
    ("", "{tmp}/dup.yaml", ["dup.yaml:4:3", "'lr' appears twice"]),
    ("", "{tmp}/section.yaml", ["section 'train' must be a mapping"]),
    ("", "{tmp}/intkey.yaml", ["section 'model' has a key 1"]),
    ("", "{tmp}/nothere.yaml", ["nothere.yaml", "no such file"]),
    ("model.preset={tmp}/model_bad.yaml", None, ["model_bad.yaml:3:1: invalid YAML"]),
]


@pytest.mark.parametrize("overrides,config,expect", CASES, ids=[c[0] or c[1].split("/")[-1] for c in CASES])
def test_bad_value_exits_2_naming_the_field(overrides, config, expect, tmp_path, capsys, monkeypatch):
    _files(tmp_path)

    def no_build(*a, **k):
        raise AssertionError("a model was built: the bad value was not refused before compiling")
    monkeypatch.setattr("jaxtx.model.build", no_build)
    monkeypatch.setattr("jaxtx.train.cli.setup_jax_cache", lambda: None)  # keep the test session's jax config
    args = [a.format(tmp=tmp_path) for a in overrides.split()]
    config = (config or "configs/tiny.yaml").format(tmp=tmp_path)
    rc = cli.main(["train", config, *BASE, f"out_dir={tmp_path}/run", *args])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    msg = err.strip().splitlines()
    assert len(msg) == 1, err  # one line
    for e in expect:
        assert e in msg[0], msg[0]


# ------------------------------------------------------------------------------------------------ accepted values
def test_source_is_inferred_from_the_path(tmp_path):
    """data.path=my.jsonl with no data.source used to train on the standard library; now it reads the file."""
    f = tmp_path / "my.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"record {i}", "id": i}) for i in range(5)) + "\n")
    cfg = load_run_config("configs/tiny.yaml", [f"data.path={f}"])
    assert cfg.data.source == "jsonl" and cfg.to_dict()["data"]["source"] == "jsonl"
    assert data.read_documents(cfg) == [f"record {i}" for i in range(5)]
    (tmp_path / "docs").mkdir()
    for name, text in [("b.txt", "second"), ("a.md", "first"), (".hidden", "skipped")]:
        (tmp_path / "docs" / name).write_text(text)
    cfg = run_cfg([f"data.path={tmp_path}/docs"])
    assert cfg.data.source == "text" and data.read_documents(cfg) == ["first", "second"]  # sorted, hidden skipped
    assert run_cfg([]).data.source == "stdlib"
    assert DataConfig(path="x.ndjson").source == "jsonl" and DataConfig(path="*.txt").source == "text"
    assert DataConfig(source="jsonl", path="data.log").source == "jsonl"  # explicit and not contradicted: kept


def test_text_glob_that_reaches_jsonl_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"b.jsonl \(JSON Lines\) as plain text: set data.source=jsonl"):
        data.read_documents(run_cfg([f"data.path={tmp_path}/*"]))


def test_utf8_text_with_bom_and_non_ascii_is_read_exactly(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffnaïve café ☃\r\n".encode())
    (tmp_path / "b.jsonl").write_bytes('\ufeff{"text": "ünï"}\n'.encode())
    assert data.read_documents(run_cfg([f"data.path={tmp_path}/a.txt"])) == ["naïve café ☃\r\n"]
    assert data.read_documents(run_cfg([f"data.path={tmp_path}/b.jsonl"])) == ["ünï"]


def test_zero_intervals_are_accepted():
    """eval_every=0: eval only at the end; ckpt_every=0: only the final checkpoint (the loop gives them meaning)."""
    cfg = run_cfg(["train.eval_every=0", "train.ckpt_every=0", "train.samples=0"])
    assert (cfg.train.eval_every, cfg.train.ckpt_every, cfg.train.samples) == (0, 0, 0)


@pytest.mark.parametrize("clip", ["0", "null"])
def test_clip_off_means_plain_adamw(clip):
    """clip_norm 0 or null: the optimizer applies exactly AdamW (a huge gradient is not rescaled)."""
    import jax.numpy as jnp
    import optax
    o = run_cfg([f"optim.clip_norm={clip}", "optim.warmup_steps=0", "optim.decay=constant"]).optim
    params = {"kernel": jnp.ones((2, 2))}
    grads = {"kernel": jnp.full((2, 2), 1e3)}
    ours = make_optimizer(o, 10)
    ref = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    u, _ = ours.update(grads, ours.init(params), params)
    r, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(u["kernel"], r["kernel"], rtol=1e-6)


def test_yaml_exponent_floats_and_short_runs(tmp_path):
    """`lr: 1e-3` is a float (YAML 1.1 read it as a string); a warmup longer than a smoke run is capped, not refused."""
    p = tmp_path / "r.yaml"
    p.write_text("model: {preset: tiny}\noptim: {lr: 1e-3, eps: 1E-9}\ntrain: {steps: 5}\n")
    cfg = load_run_config(p, ["optim.warmup_steps=40"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-9
    from jaxtx.train.optim import lr_schedule
    assert float(lr_schedule(cfg.optim, 5)(4)) == pytest.approx(1e-3)  # peak reached at the last step


def test_one_text_file_holds_out_its_tail(tmp_path):
    """A single file (one document) used to be refused ("need at least 2"); its last lines are now the eval split."""
    text = "".join(f"line {i}\n" for i in range(100))
    assert data.split([text], 0.1) == ([text[:text.index("line 90")]], [text[text.index("line 90"):]])
    with pytest.raises(ConfigError, match="1 document"):
        data.split([{"prompt": "a", "response": "b"}], 0.1)  # one record cannot be split
