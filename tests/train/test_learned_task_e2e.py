"""Train/generate skew, end to end (issue 10): a hidden task trained through the real `jaxtx train` entry point on a
JSONL file is answered through `jaxtx generate --run` (greedy), the serving engine and `jaxtx serve` exactly as
often, row by row, as the model answers it teacher-forced in the context training gave it. Greedy decoding is
argmax over the same logits teacher forcing reads, so when the prompt is laid out as in training the two must agree
on every row; a prompt laid out otherwise (the EOS prefix `generate` used to add) shows the model a context it never
saw, and its answers differ (the test shows that as well, so it can fail on a skewed layout).

Tasks on 4 digits, 3000 training strings, 40 held-out ones: causal learns "each digit + 1 (mod 10)", one text per
JSONL record ("3827=4938"); SFT learns reversal, {"prompt": "3827=", "response": "7283"}. The tokenizer is the run's
own sentencepiece BPE (split_digits: one token per digit). Measured (40 held-out prompts, exact match of the answer
and its EOS): causal 40/40 teacher-forced = CLI = engine = server, 25/40 after an EOS prefix; SFT 40/40, 28/40 after
an EOS prefix. Before `jaxtx serve` read the run's layout, the server answered 25/40 on the causal task.
Time: ~80 s for the file with no jit cache on the 2-core machine at load 5 (training ~40 s, the engine and serve
compiles ~30 s), ~45 s with the persistent cache warm."""
import json
import shutil
import time

import jax
import numpy as np
import pytest
from train_helpers import ONE_DEVICE, TINY_MODEL

from jaxtx import run_dir as rd
from jaxtx.cli import main
from jaxtx.train.tokenizer import EOS

N_DIGITS, N_TRAIN, N_HELD = 4, 3000, 40
N_NEW = N_DIGITS + 2  # the answer, EOS, and one more: a model that does not stop is caught


@pytest.fixture(scope="module", autouse=True)
def _no_persistent_cache():
    import jaxtx.train.cli
    with pytest.MonkeyPatch.context() as mp:  # keep the test process's own jax config
        mp.setattr(jaxtx.train.cli, "setup_jax_cache", lambda: None)
        yield


TASKS = {"plus1": lambda s: "".join(str((int(c) + 1) % 10) for c in s), "reverse": lambda s: s[::-1]}


def _split(rng) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out digit strings."""
    picks = rng.choice(10 ** N_DIGITS, N_TRAIN + N_HELD, replace=False)
    strs = [f"{int(x):0{N_DIGITS}d}" for x in picks]
    return strs[:N_TRAIN], strs[N_TRAIN:]


def _train(tmp, objective: str, task: str, steps: int) -> tuple:
    """(run dir, held-out prompts, their answers, seconds) after `jaxtx train` on a JSONL file of the task."""
    train, held = _split(np.random.default_rng(0))
    _answer = TASKS[task]
    path = tmp / "data.jsonl"
    with path.open("w") as f:
        for s in train:
            a = _answer(s)
            rec = {"text": f"{s}={a}"} if objective == "causal" else {"prompt": f"{s}=", "response": a}
            f.write(json.dumps(rec) + "\n")
    out = tmp / "run"
    seq = "train.seq_len=64" if objective == "causal" else "train.seq_len=16"
    t0 = time.perf_counter()
    rc = main(["train", "configs/tiny.yaml", *TINY_MODEL, *ONE_DEVICE, f"data.path={path}",
               f"train.objective={objective}", seq, "train.batch_size=16", f"train.steps={steps}", "optim.lr=3e-3",
               "optim.warmup_steps=20", "optim.weight_decay=0.0", "train.log_every=50", f"train.eval_every={steps}",
               f"train.ckpt_every={steps}", "train.eval_batches=1", "train.progress=false", "train.samples=0",
               f"out_dir={out}"])
    assert rc == 0  # the log (in pytest's captured output) says why
    return out, [f"{s}=" for s in held], [_answer(s) for s in held], time.perf_counter() - t0


def _teacher_forced(run, prompts, answers, layout) -> list[bool]:
    """Per row: does argmax at every response position (the answer's tokens, then EOS) give the target, with the
    prompt laid out by `layout`?"""
    from jaxtx.infer.loading import load_run
    loaded = load_run(run)
    tok, model, params = loaded.tokenizer, loaded.model, loaded.params
    rows, spans = [], []
    for p, a in zip(prompts, answers):
        pi, ai = tok.encode(p), tok.encode(a)
        assert tok.encode(p + a) == pi + ai  # the causal document tokenizes as prompt then answer (split_digits)
        ids = layout.apply(pi) + ai + [tok.eos_id]
        rows.append(ids)
        spans.append((len(ids) - len(ai) - 1, len(ids)))
    T = max(len(r) for r in rows)
    assert all(len(r) == T for r in rows)  # equal-length prompts: one batch, no padding
    logits = model.apply({"params": params}, np.asarray(rows, np.int32))  # [R, T, V]
    pred = np.asarray(jax.numpy.argmax(logits, -1))
    return [bool((pred[i, s - 1:e - 1] == np.asarray(rows[i][s:e])).all()) for i, (s, e) in enumerate(spans)]


def _cli_greedy(run, prompts, n_new, tmp, capsys) -> list[str]:
    """`jaxtx generate --run RUN --prompts-file F` (greedy, batched): the completion text of each prompt."""
    f = tmp / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    capsys.readouterr()
    rc = main(["generate", "--run", str(run), "--prompts-file", str(f), "--max-new-tokens", str(n_new)])
    got = capsys.readouterr()
    assert rc == 0, got.err[-3000:]
    lines = got.out.splitlines()
    outs = [lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("=== ") else ""
            for i, line in enumerate(lines) if line.startswith("=== ")]
    assert len(outs) == len(prompts), got.out
    return outs


def _with_layout(run, tmp, layout) -> object:
    """A copy of the run dir whose recorded layout is `layout` (what a skewed consumer would feed)."""
    dst = tmp / "skewed"
    shutil.copytree(run, dst)
    rd.write_prompt_layout(dst, layout)
    return dst


def _engine_greedy(run, prompts, n_new) -> list[str]:
    """The serving engine (paged KV cache, continuous batching) fed the prompts as `jaxtx generate` lays them out."""
    from jaxtx.infer.engine import Engine, EngineConfig
    from jaxtx.infer.generation import for_decoding
    from jaxtx.infer.loading import load_run
    loaded = load_run(run)
    tok = loaded.tokenizer
    model, params = for_decoding(loaded.model, loaded.params)
    engine = Engine(model, params, EngineConfig(max_seqs=8, page_size=8, num_pages=64, max_tokens_per_step=64,
                                                decode_steps=2, max_logprobs=0), warmup=False)
    res = engine.generate([loaded.prompt_layout.apply(tok.encode(p)) for p in prompts], max_new_tokens=n_new,
                          eos_id=tok.eos_id)
    return [tok.decode([t for t in toks if t != tok.eos_id]) for toks in res.tokens]


def _server_greedy(run, prompts, n_new) -> list[str]:
    """`jaxtx serve --run` in process (its own build path), asked through the openai client: one completions request
    with every prompt, temperature 0."""
    import argparse

    import openai
    from fastapi.testclient import TestClient

    from jaxtx.infer.server import cli
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--run", str(run), "--max-seqs", "8", "--page-size", "8",
                              "--max-tokens-per-step", "64", "--decode-steps", "2", "--no-prompt-logprobs",
                              "--max-logprobs", "0"])
    app, _ = cli.build(args)
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        r = client.completions.create(model="run", prompt=prompts, max_tokens=n_new, temperature=0)
    return [c.text for c in sorted(r.choices, key=lambda c: c.index)]


@pytest.fixture(scope="module", params=[("causal", "plus1", 300), ("sft", "reverse", 400)], ids=["causal", "sft"])
def trained(request, tmp_path_factory):
    """(objective, run dir, held-out prompts, answers): trained once per objective for both tests below."""
    objective, task, steps = request.param
    tmp = tmp_path_factory.mktemp(objective)
    run, prompts, answers, secs = _train(tmp, objective, task, steps)
    print(f"\n{objective}: train {steps} steps {secs:.1f}s")
    layout = rd.read_prompt_layout(run)
    assert layout == rd.PromptLayout()  # decoder objectives: nothing before the user's text (train/sample.py)
    tf = _teacher_forced(run, prompts, answers, layout)
    assert sum(tf) >= 0.9 * len(tf), sum(tf)  # learned: a skewed consumer shows in the counts
    return objective, run, prompts, answers, tf


def _report(objective, got: dict, t0: float):
    print(f"\n{objective}: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in got.items()) +
          f" ({time.perf_counter() - t0:.1f}s)")


def test_greedy_through_the_cli_equals_teacher_forced(trained, tmp_path, capsys):
    objective, run, prompts, answers, tf = trained
    t0 = time.perf_counter()
    cli = [o == a for o, a in zip(_cli_greedy(run, prompts, N_NEW, tmp_path, capsys), answers)]
    # the layout training did not use: EOS before the prompt (what `jaxtx generate --run` fed before issue 10)
    eos = rd.PromptLayout(prefix=(EOS,))
    tf_eos = _teacher_forced(run, prompts, answers, eos)
    cli_eos = [o == a for o, a in zip(_cli_greedy(_with_layout(run, tmp_path, eos), prompts, N_NEW, tmp_path, capsys),
                                      answers)]
    with capsys.disabled():
        _report(objective, {"teacher-forced": tf, "cli": cli, "teacher-forced EOS-prefixed": tf_eos,
                            "cli EOS-prefixed": cli_eos}, t0)
    assert cli == tf  # row by row
    assert cli_eos == tf_eos
    # neither a packed document nor an SFT row ever has an EOS before its text: the model answers worse after one
    assert sum(cli_eos) < sum(tf) - 0.2 * len(tf)


def test_greedy_through_the_engine_and_server_equals_teacher_forced(trained, capsys):
    objective, run, prompts, answers, tf = trained
    t0 = time.perf_counter()
    engine = [o == a for o, a in zip(_engine_greedy(run, prompts, N_NEW), answers)]
    server = [o == a for o, a in zip(_server_greedy(run, prompts, N_NEW), answers)]
    with capsys.disabled():
        _report(objective, {"teacher-forced": tf, "engine": engine, "server": server}, t0)
    assert engine == tf and server == tf  # row by row
