"""`jaxtx serve --run`: a training run dir (sentencepiece tokenizer, orbax checkpoint) served in-process through the
same build path as the command; greedy text equals jaxtx.infer.generate on the prompt as run dirs encode it."""
import io

import jax
import numpy as np
import openai
import orbax.checkpoint as ocp
import pytest
import yaml
from fastapi.testclient import TestClient

from jaxtx import model as model_lib
from jaxtx.config import load_model_config
from jaxtx.infer.server import cli


def _write_run_dir(path):
    spm = pytest.importorskip("sentencepiece")
    cfg = load_model_config("tiny", ["vocab_size=128", "d_model=32", "n_heads=4", "n_kv_heads=2", "d_ff=64",
                                     "n_layers=2", "init_std=0.3", "max_seq_len=128"])
    model = model_lib.build(cfg)
    params = model_lib.init_params(model, jax.random.key(0))
    text = "hello world, the quick brown fox jumps over the lazy dog\n" * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines(keepends=True)), model_writer=buf,
                                   vocab_size=64, model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   minloglevel=2)
    path.mkdir(parents=True)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    conf = {"model": {"preset": "tiny", **cfg.to_dict()}, "data": {"tokenizer": None}, "out_dir": str(path)}
    (path / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    state = {"step": np.int32(3), "params": params, "opt_state": {}}
    with ocp.CheckpointManager(path / "checkpoints") as m:
        m.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 3})))
        m.wait_until_finished()


def test_serve_run_dir(tmp_path):
    from jaxtx.infer import generate
    from jaxtx.infer.generation import for_decoding
    from jaxtx.infer.loading import load_run
    from jaxtx.infer.server.tokenizer import load_run_tokenizer
    import argparse

    _write_run_dir(tmp_path / "run")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    tpl = tmp_path / "chat.jinja"
    tpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    args = parser.parse_args(["serve", "--run", str(tmp_path / "run"), "--max-seqs", "4", "--max-tokens-per-step",
                              "16", "--decode-steps", "1", "--no-prompt-logprobs", "--chat-template", str(tpl)])
    app, lines = cli.build(args)
    assert any(line.startswith("KV cache") for line in lines) and "template loaded" in lines[-1]
    tok = load_run_tokenizer(tmp_path / "run" / "tokenizer.model")
    loaded = load_run(tmp_path / "run")
    model, params = for_decoding(loaded.model, loaded.params)
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        ids = loaded.prompt_layout.apply(tok.encode("the quick brown", add_special_tokens=False))
        assert ids[0] != 3  # run dirs: prompted as training laid them out (run_dir.PromptLayout), not after an EOS
        want = generate(model, params, [ids], max_new_tokens=12, eos_id=3).tokens[0]
        r = client.completions.create(model="run", prompt="the quick brown", max_tokens=12, temperature=0)
        assert r.choices[0].text == tok.decode(ids + want)[len(tok.decode(ids)):]
        c = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=5, temperature=0)
        assert c.usage.prompt_tokens == len(tok.encode("user: hello\nassistant:", add_special_tokens=False))
