"""Learning proof: the whole `jaxtx train` path (synthetic data, tokenizer, SFT loss on responses, AdamW, checkpoints)
teaches a tiny decoder to reverse digit strings; greedy decoding then solves held-out prompts (>= 99% exact)."""
import pytest
from train_helpers import ONE_DEVICE

from jaxtx.train import data
from jaxtx.train.config import load_run_config
from jaxtx.train.loop import train
from jaxtx.train.sample import greedy_generate
from jaxtx.train.tokenizer import EOS


@pytest.mark.slow  # 95 s on 2 cores; tests/train/test_learned_task_e2e.py proves learning end to end in CI
def test_reverse_digit_strings_exact_match(tmp_path):
    cfg = load_run_config("sft", [*ONE_DEVICE, "data.eval_fraction=0.1", "train.steps=800", "train.progress=false",
                                  "train.samples=0", "train.eval_every=800", "train.ckpt_every=800",
                                  f"out_dir={tmp_path}"])
    out = train(cfg, log=lambda *a: None)
    train_docs, held_out = data.split(data.read_documents(cfg), cfg.data.eval_fraction)
    seen = {d["prompt"] for d in train_docs}
    held_out = [d for d in held_out if d["prompt"] not in seen]  # strings the model never trained on
    assert len(held_out) > 200
    tok = out["tokenizer"]
    outs = greedy_generate(out["model"], out["params"], [tok.encode(d["prompt"]) for d in held_out], 10, eos_id=EOS)
    got = [tok.decode(o) for o in outs]
    right = sum(g == d["response"] for g, d in zip(got, held_out))
    wrong = [(d["prompt"], g) for g, d in zip(got, held_out) if g != d["response"]][:5]
    assert right / len(held_out) >= 0.99, (right, len(held_out), wrong)
