"""Bad input to the decoding API and to `jaxtx generate` / `jaxtx info` is refused with one clear line; the CLI
clamps to a model's position limit with a note, says when a completion is cut there, and prompts a run dir with the
layout it records.

The refusals are tables: each case names the argument (or flag) and the value in its message. Every case raises
before anything is compiled, so the tables cost little; the few positive cases compare the CLI's tokens with the
Python API's (the static generate path)."""
import math
from pathlib import Path

import numpy as np
import pytest

from jaxtx.cli import main
from jaxtx.infer import beam_search, generate, speculative_generate, stream
from jaxtx.infer.prompts import PromptError, as_rows, row_seeds

from infer_models import small_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
GPT2 = FIXTURES / "gpt2"  # V=128, learned positions, n_positions=64, no tokenizer


# ------------------------------------------------------------------------------------------------ Python API
ARR = np.array([[5, 17, 3, 0, 0], [9, 1, 2, 60, 33]])
API_CASES = [  # (kwargs for generate, substring of the message)
    (dict(prompts="hello"), "prompts='hello': got a string"),
    (dict(prompts=b"hi"), "got a string"),
    (dict(prompts=[]), "prompts: got an empty batch"),
    (dict(prompts=np.zeros((0, 4), np.int32)), "empty batch"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1.0, 2.0]]), "prompts[0][0]: expected an integer token id, got float 1.0"),
    (dict(prompts=[1, 2.5]), "prompts[1]=2.5: expected an integer token id, got float"),
    (dict(prompts=[[1, True]]), "prompts[0][1]: expected an integer token id, got bool"),
    (dict(prompts=np.array([[1.0, 2.0]])), "expected integer token ids, got a float64 array"),
    (dict(prompts=[np.array([1.5, 2.0])]), "prompts[0]: expected integer token ids, got a float64 array"),
    (dict(prompts=[[[1, 2]]]), "prompts[0][0]: expected an integer token id, got a nested list"),
    (dict(prompts=[[1, 2], [3, [4]]]), "prompts[1][1]: expected an integer token id, got a nested list"),
    (dict(prompts=[[1, 2], 3]), "prompts[1]=3: a token id beside prompt lists"),
    (dict(prompts=np.zeros((1, 2, 3), np.int32)), "got shape (1, 2, 3)"),
    (dict(prompts=[[1, -3]]), "prompt 0: token id -3 at index 1 is outside the vocabulary [0, 97)"),
    (dict(prompts=[[1, 97]]), "token id 97 at index 1 is outside the vocabulary [0, 97)"),
    (dict(prompts=ARR, lengths=[3, -2]), "lengths[1]=-2: expected 1 <= length <= 5"),
    (dict(prompts=ARR, lengths=[3, 0]), "lengths[1]=0: expected 1 <= length <= 5"),
    (dict(prompts=ARR, lengths=[3, 7]), "lengths[1]=7: expected 1 <= length <= 5"),
    (dict(prompts=ARR, lengths=[3.0, 2]), "lengths[0]=3.0: expected an integer"),
    (dict(prompts=ARR, lengths=[3]), "lengths: expected shape (2,)"),
    (dict(prompts=ARR, lengths=3), "lengths=3: expected one length per row"),
    (dict(prompts=[[1, 2]], lengths=[2]), "lengths: only meaningful with a padded"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5: expected an integer >= 1, got float"),
    (dict(max_new_tokens=0), "max_new_tokens=0: expected an integer >= 1"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(max_new_tokens=True), "max_new_tokens=True"),
    (dict(max_len=0), "max_len=0: expected an integer >= 1"),
    (dict(eos_id=97), "eos_id=97: token id outside the vocabulary [0, 97)"),
    (dict(eos_id=-1), "eos_id=-1: token id outside the vocabulary"),
    (dict(eos_id=3.0), "eos_id=3.0: expected an integer token id"),
    (dict(eos_id=[3, 200]), "eos_id[1]=200: token id outside the vocabulary"),
    (dict(stop=[[5, 100]]), "stop[0][1]=100: token id outside the vocabulary"),
    (dict(stop=["\n"]), "stop[0]='\\n': stop strings need a tokenizer"),
    (dict(stop="x"), "stop='x': expected a list"),
    (dict(seed=-1), "seed=-1: row seed -1 is outside [0, 2**32)"),
    (dict(seed=2 ** 32 - 1), "row seed 4294967296 is outside"),  # row 1 gets seed + 1
    (dict(seed=1.5), "seed=1.5: expected an integer"),
    (dict(seed=[1]), "seed=[1]: expected an int or 2 integer per-row seeds"),
]


def _call(fn, kwargs):
    model, params = small_model("llama")
    kw = dict(prompts=[[5, 17, 3], [9, 1]], max_new_tokens=4)
    kw.update(kwargs)
    return fn(model, params, kw.pop("prompts"), **kw)


@pytest.mark.parametrize("kwargs,msg", API_CASES, ids=[m[:40] for _, m in API_CASES])
def test_generate_refuses_bad_arguments(kwargs, msg):
    with pytest.raises(PromptError) as e:
        _call(generate, kwargs)
    assert msg in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)


STREAM_CASES = API_CASES[::3]  # the same checks: stream goes through the same validation before its first step


@pytest.mark.parametrize("kwargs,msg", STREAM_CASES, ids=[m[:40] for _, m in STREAM_CASES])
def test_stream_refuses_bad_arguments(kwargs, msg):
    with pytest.raises(PromptError) as e:
        next(iter(_call(stream, kwargs)))
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_beams=2.0), "num_beams=2.0: expected an integer"),
    (dict(length_penalty=float("nan")), "length_penalty=nan: expected a finite number"),
    (dict(length_penalty=math.inf), "length_penalty=inf"),
    (dict(eos_id=200), "eos_id=200: token id outside the vocabulary"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(prompts="hello"), "prompts='hello': got a string"),
    (dict(prompts=ARR, lengths=[3, -2]), "lengths[1]=-2"),
])
def test_beam_search_refuses_bad_arguments(kwargs, msg):
    kw = dict(num_beams=2)
    kw.update(kwargs)
    with pytest.raises(ValueError) as e:
        _call(beam_search, kw)
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(eos_id=97), "eos_id=97"),
    (dict(stop=[[1, -1]]), "stop[0][1]=-1"),
    (dict(prompts=[[1.5]]), "prompts[0][0]"),
    (dict(seed=-4), "seed=-4"),
])
def test_speculative_refuses_bad_arguments(kwargs, msg):
    model, params = small_model("llama")
    kw = dict(prompts=[[5, 17, 3]], max_new_tokens=4, k=2)
    kw.update(kwargs)
    with pytest.raises(PromptError) as e:
        speculative_generate(model, params, model, params, kw.pop("prompts"), **kw)
    assert msg in str(e.value), str(e.value)


def test_accepted_forms_still_work():
    """Tuples, numpy rows, numpy ints as eos/seed and an int array with numpy lengths are still prompts; they give
    the tokens of the plain-list call (the validation refuses types, not valid spellings)."""
    model, params = small_model("llama")
    want = generate(model, params, [[5, 17, 3], [9, 1, 2, 60, 33]], max_new_tokens=4, eos_id=7).tokens
    rows = [(5, 17, 3), np.array([9, 1, 2, 60, 33], np.int32)]
    assert generate(model, params, rows, max_new_tokens=np.int64(4), eos_id=np.int32(7)).tokens == want
    assert generate(model, params, ARR.astype(np.int32), lengths=np.array([3, 5]), max_new_tokens=4,
                    eos_id=[7]).tokens == want
    assert [r.tolist() for r in as_rows([1, 2, 3])] == [[1, 2, 3]]
    assert row_seeds(np.array([0, 2 ** 32 - 1]), 2, 4).tolist() == [0, 2 ** 32 - 1, 0, 0]


# ------------------------------------------------------------------------------------------------ CLI
def _cli(argv, capsys):
    """main() as the `jaxtx` script runs it: argparse errors exit through SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _bad_files(tmp):
    (tmp / "latin1.txt").write_bytes("def f():\n    return 'caf\xe9'\n".encode("latin-1"))
    (tmp / "blank.txt").write_text("def f():\n\nreturn 1\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "adir").mkdir()


G = ["generate", "--hf", str(GPT2), "--prompt-ids", "1,2,3"]
CLI_CASES = [  # (argv, substrings that must be in stderr)
    (G + ["--beams", "0"], ["argument --beams", "0 is not >= 1"]),
    (G + ["--beams", "-2"], ["argument --beams", "-2"]),
    (G + ["--beams", "2", "--temperature", "0.7"], ["--beams 2 cannot be combined with --temperature",
                                                     "deterministic"]),
    (G + ["--beams", "3", "--top-k", "5", "--seed", "1"], ["--beams 3 cannot be combined with --top-k, --seed"]),
    (G + ["--beams", "2", "--top-p", "0.9"], ["--top-p"]),
    (G + ["--beams", "2", "--repetition-penalty", "1.2"], ["--repetition-penalty"]),
    (G + ["--beams", "2", "--int8-kv"], ["--beams 2 cannot be combined with --int8-kv"]),
    (G + ["--beams", "2", "--seed", "0"], ["--beams 2 cannot be combined with --seed"]),
    (G + ["--beams", "2", "--draft", str(GPT2)], ["--beams 2 cannot be combined with --draft"]),
    (G + ["--beams", "2", "--length-penalty", "nan"], ["argument --length-penalty", "nan is not a finite"]),
    (G + ["--beams", "2", "--length-penalty", "inf"], ["argument --length-penalty", "inf"]),
    (G + ["--length-penalty", "2"], ["--length-penalty 2.0 only applies to beam search"]),
    (G + ["--temperature", "-1"], ["argument --temperature", "-1 is not >= 0.0"]),
    (G + ["--temperature", "nan"], ["argument --temperature", "not a finite number"]),
    (G + ["--temperature", "0.8", "--top-p", "0"], ["argument --top-p", "0 is not in (0.0, 1.0]"]),
    (G + ["--temperature", "0.8", "--top-p", "1.5"], ["argument --top-p", "1.5"]),
    (G + ["--temperature", "0.8", "--top-k", "-1"], ["argument --top-k", "-1 is not >= 0"]),
    (G + ["--temperature", "0.8", "--min-p", "2"], ["argument --min-p", "2 is not in [0.0, 1.0]"]),
    (G + ["--repetition-penalty", "0"], ["argument --repetition-penalty", "0 is not > 0.0"]),
    (G + ["--frequency-penalty", "inf"], ["argument --frequency-penalty", "inf"]),
    (G + ["--top-p", "0.9"], ["--top-p: no effect under greedy decoding", "--temperature"]),
    (G + ["--max-new-tokens", "0"], ["argument --max-new-tokens", "0 is not >= 1"]),
    (G + ["--max-new-tokens", "2.5"], ["argument --max-new-tokens", "'2.5' is not an integer"]),
    (G + ["--max-len", "0"], ["argument --max-len"]),
    (G + ["--seed", "-1"], ["argument --seed", "-1 is not in [0, 4294967295]"]),
    (G + ["--draft-k", "3"], ["--draft-k 3 only applies to speculative decoding"]),
    (G + ["--draft", str(GPT2), "--int8-kv"], ["--draft cannot be combined with --int8-kv"]),
    (G + ["--draft", str(GPT2), "--draft-k", "0"], ["argument --draft-k"]),
    (G + ["--step", "3"], ["--step 3 only applies to --run"]),
    (G + ["--stop", ""], ["--stop ''"]),
    (G + ["--no-eos-prefix"], ["unrecognized arguments: --no-eos-prefix"]),
    (["generate", "--hf", str(GPT2), "--prompt-ids", "1,2,x"], ["--prompt-ids '1,2,x': expected comma-separated"]),
    (["generate", "--hf", str(GPT2), "--prompt-ids", "1,500"], ["token id 500 at index 1 is outside the vocabulary"]),
    (["generate", "--hf", str(GPT2), "--prompt-ids", "1,2,3,4,5", "--max-len", "4"],
     ["prompt 0 has 5 tokens but the cache holds at most 4"]),
    (["generate", "--hf", str(GPT2), "--prompt", ""], ["--prompt '': the prompt is empty"]),
    (["generate", "--hf", str(GPT2), "--prompt", "hello"], ["no tokenizer", "--prompt-ids"]),
    (["generate", "--hf", str(GPT2), "--prompts-file", "{tmp}/latin1.txt"],
     ["--prompts-file {tmp}/latin1.txt: not UTF-8 text (byte 0xe9 at offset 24, line 2)"]),
    (["generate", "--hf", str(GPT2), "--prompts-file", "{tmp}/blank.txt"], ["blank.txt: line 2 is empty"]),
    (["generate", "--hf", str(GPT2), "--prompts-file", "{tmp}/empty.txt"], ["empty.txt: no prompts in the file"]),
    (["generate", "--hf", str(GPT2), "--prompts-file", "{tmp}/missing.txt"], ["missing.txt: no such file"]),
    (["generate", "--hf", str(GPT2), "--prompts-file", "{tmp}/adir"], ["adir: cannot be read"]),
    (["info", "tiny", "--seq-len", "-5"], ["argument --seq-len", "-5 is not >= 1"]),
    (["info", "tiny", "--seq-len", "0"], ["argument --seq-len"]),
    (["info", "tiny", "--batch", "0"], ["argument --batch", "0 is not >= 1"]),
    (["info", "tiny", "--compute", "0"], ["argument --compute", "0 is not > 0.0"]),
    (["info", "tiny", "--compute=-1e20"], ["argument --compute", "-1e20 is not > 0.0"]),
    (["info", "tiny", "--compute", "nan"], ["argument --compute", "not a finite number"]),
    (["info", "tiny", "--kv-dtype", "floaty"], ["--kv-dtype 'floaty': expected one of"]),
]


@pytest.mark.parametrize("argv,msgs", CLI_CASES, ids=[" ".join(a[3:] if a[0] == "generate" else a[1:])[:50]
                                                      for a, _ in CLI_CASES])
def test_cli_refuses_bad_input(argv, msgs, tmp_path, capsys):
    _bad_files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = _cli(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    for m in msgs:
        assert m.replace("{tmp}", str(tmp_path)) in err, err
    assert out == ""


def test_sizing_refuses_negative_sizes():
    from jaxtx import sizing
    from jaxtx.config import load_model_config
    cfg = load_model_config("tiny")
    for call, msg in [(lambda: sizing.kv_cache_bytes(cfg, -5), "seq_len=-5"),
                      (lambda: sizing.kv_cache_bytes(cfg, 8, batch=-1), "batch=-1"),
                      (lambda: sizing.flops_per_token(cfg, -1), "seq_len=-1"),
                      (lambda: sizing.flops_per_token(cfg, float("nan")), "seq_len=nan"),
                      (lambda: sizing.report(cfg, seq_len=0), "seq_len=0"),
                      (lambda: sizing.chinchilla(float("inf")), "must be > 0 FLOPs and finite")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            call()
    assert sizing.kv_cache_bytes(cfg, 0) == 0 and sizing.kv_cache_bytes(cfg, 8, batch=0) == 0  # empty is not bad


# ------------------------------------------------------------------------------------------------ position limit
def test_cli_clamps_to_the_position_limit_and_says_so(capsys):
    """GPT-2 has 64 learned positions: 100 new tokens after a 10-token prompt are clamped to 54 with a note, the cut
    is reported with finish reason "length", and the tokens are those of generate(max_new_tokens=54)."""
    from jaxtx import hf
    model, params = hf.load(GPT2)
    prompt = list(range(1, 11))
    ids = ",".join(map(str, prompt))
    rc, out, err = _cli(["generate", "--hf", str(GPT2), "--prompt-ids", ids, "--max-new-tokens", "100"], capsys)
    assert rc == 0, err
    assert "--max-new-tokens 100 clamped to 54" in err and "max_seq_len=64" in err, err
    assert "stopped at the model's position limit" in err and "finish reason: length" in err, err
    want = generate(model, params, [prompt], max_new_tokens=54)
    assert [int(t) for t in out.split()] == want.tokens[0] and len(want.tokens[0]) == 54
    # what fits is not clamped and says nothing
    rc, out, err = _cli(["generate", "--hf", str(GPT2), "--prompt-ids", ids, "--max-new-tokens", "6"], capsys)
    assert rc == 0 and err == "" and [int(t) for t in out.split()] == want.tokens[0][:6]
    # --max-len is a limit too (no window: the cache holds max_len positions)
    rc, out, err = _cli(["generate", "--hf", str(GPT2), "--prompt-ids", ids, "--max-len", "16"], capsys)
    assert rc == 0 and "clamped to 6" in err and "--max-len 16" in err and len(out.split()) == 6, err


def test_speculative_cli_clamps_to_the_position_limit(capsys):
    """Speculative decoding needs k + 1 look-ahead positions: with --draft-k 3, 64 - 10 - 4 = 50 new tokens fit; the
    greedy result equals the target's own greedy tokens."""
    from jaxtx import hf
    model, params = hf.load(GPT2)
    prompt = list(range(1, 11))
    rc, out, err = _cli(["generate", "--hf", str(GPT2), "--draft", str(GPT2), "--draft-k", "3", "--prompt-ids",
                         ",".join(map(str, prompt)), "--max-new-tokens", "100"], capsys)
    assert rc == 0, err
    assert "clamped to 50" in err and "finish reason: length" in err, err
    assert [int(t) for t in out.split()] == generate(model, params, [prompt], max_new_tokens=50).tokens[0]


# ------------------------------------------------------------------------------------------------ prompt layout
def test_cli_feeds_the_recorded_prompt_layout(tmp_path, capsys):
    """A run dir that records a layout (here: BOS before the text) is prompted with exactly those ids: the CLI's
    output equals generate() on layout.apply(tok.encode(text)), and differs from the bare text (the test has
    power)."""
    from jaxtx import run_dir
    from jaxtx.infer.loading import load_run
    from test_cli import _write_run_dir
    model, params = _write_run_dir(tmp_path / "run")
    run_dir.write_prompt_layout(tmp_path / "run", run_dir.PromptLayout(prefix=(2,)))
    loaded = load_run(tmp_path / "run")
    assert loaded.prompt_layout == run_dir.PromptLayout(prefix=(2,))
    tok = loaded.tokenizer
    text = "def main():"
    fed = loaded.prompt_layout.apply(tok.encode(text))
    assert fed == [2] + tok.encode(text)
    want = generate(model, params, [fed], max_new_tokens=12, eos_id=3).tokens[0]
    bare = generate(model, params, [tok.encode(text)], max_new_tokens=12, eos_id=3).tokens[0]
    assert want != bare
    rc, out, err = _cli(["generate", "--run", str(tmp_path / "run"), "--prompt", text, "--max-new-tokens", "12"],
                        capsys)
    assert rc == 0, err
    assert out == tok.decode(want) + "\n"


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=float("inf")), "Sampling.temperature=inf: must be a finite number"),
    (dict(temperature=float("nan")), "Sampling.temperature=nan"),
    (dict(temperature=1.0, frequency_penalty=float("nan")), "Sampling.frequency_penalty=nan"),
    (dict(temperature=1.0, repetition_penalty=float("inf")), "Sampling.repetition_penalty=inf"),
    (dict(temperature=1.0, top_k=2.5), "Sampling.top_k=2.5: must be a finite integer"),
    (dict(temperature=1.0, top_p=0.0), "Sampling.top_p=0.0: must be in (0, 1]"),
])
def test_sampling_refuses_non_finite_and_out_of_range(kw, msg):
    from jaxtx.infer import Sampling
    with pytest.raises(ValueError) as e:
        Sampling(**kw)
    assert msg in str(e.value), str(e.value)
