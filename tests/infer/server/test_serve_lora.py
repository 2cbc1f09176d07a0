"""`jaxtx serve --lora NAME=DIR ...` for real: a uvicorn subprocess serving two PEFT adapters over the fixture base,
driven by the official openai client. Each completion's text equals static jaxtx.infer.generate with that one
adapter applied (greedy), requests for the base and both adapters in flight at once; /v1/models lists the base and
the adapters (parent = the base); an unknown model is a 404 naming the served ones; bad --lora values exit 2."""
import concurrent.futures
from pathlib import Path

import jax
import openai
import pytest
import serve_process

from jaxtx import hf, lora
from jaxtx.cli import main as jaxtx_main
from jaxtx.infer import generate
from jaxtx.infer.generation import for_decoding
from jaxtx.infer.server.tokenizer import load_hf_tokenizer
from lora_testing import random_b

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "server" / "llama_chat"
OTHER_BASE_ADAPTER = Path(__file__).resolve().parents[2] / "fixtures" / "peft" / "llama"  # a 64-wide llama
NAME = "tiny-chat"
EOS = [3, 1]
ENGINE_ARGS = ["--max-seqs", "4", "--page-size", "16", "--num-pages", "32", "--max-tokens-per-step", "16",
               "--decode-steps", "4", "--no-prompt-logprobs", "--max-model-len", "128"]
CONFIGS = {"sql": lora.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
           "chat": lora.LoraConfig(r=2, alpha=4, target_modules="all-linear")}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two PEFT folders for the fixture base, written by save_peft; and the base in this process."""
    model, params = for_decoding(*hf.load(FIXTURE))
    dirs = {}
    for i, (name, c) in enumerate(CONFIGS.items()):
        dirs[name] = tmp_path_factory.mktemp(name)
        lora.save_peft(model, random_b(lora.add_lora(model, params, c, jax.random.key(i)), i), dirs[name],
                       base_model_name_or_path=str(FIXTURE))
    return dirs, model, params


@pytest.fixture(scope="module")
def server(adapters):
    args = ["--hf", str(FIXTURE), "--served-model-name", NAME, "--grace", "5"] + ENGINE_ARGS + \
        [x for n, d in adapters[0].items() for x in ("--lora", f"{n}={d}")]
    with serve_process.serve(args, log_name="jaxtx-serve-lora") as (_, base, _):
        yield base


def test_adapters_served_in_one_batch_equal_single_adapter_generate(server, adapters):
    dirs, model, params = adapters
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=120)
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {NAME, "sql", "chat"}
    assert listed["sql"].parent == NAME and listed["sql"].root == str(dirs["sql"]) and listed[NAME].parent is None
    tok = load_hf_tokenizer(FIXTURE)
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    want = {}
    for name in (NAME, "sql", "chat"):
        p = params if name == NAME else lora.load_peft(model, params, dirs[name])[1]
        want[name] = tok.decode(generate(model, p, [ids], max_new_tokens=16, eos_id=EOS).tokens[0])
    assert want["sql"] != want[NAME] and want["chat"] != want[NAME]  # the adapters change the text
    # the three requests at once (twice each): they share the engine's batches
    jobs = [NAME, "sql", "chat"] * 2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda m: client.completions.create(model=m, prompt=prompt, max_tokens=16,
                                                                temperature=0), jobs))
    for name, r in zip(jobs, got):
        assert r.model == name and r.choices[0].text == want[name], name
    c = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0)
    assert c.model == "chat" and c.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=prompt, max_tokens=2)
    assert e.value.status_code == 404
    err = e.value.body if isinstance(e.value.body, dict) and "message" in e.value.body else e.value.body["error"]
    assert err["code"] == "model_not_found" and "`nope`" in err["message"]
    assert all(f"`{m}`" in err["message"] for m in (NAME, "sql", "chat"))


@pytest.mark.parametrize("value,match", [
    ("sql", "expected NAME=DIR"),
    ("=dir", "expected NAME=DIR"),
    ("x=/no/such/dir", "is not a directory"),
    (f"{NAME}=.", "already taken"),
])
def test_bad_lora_values_exit_2(value, match, capsys):
    rc = jaxtx_main(["serve", "--hf", str(FIXTURE), "--served-model-name", NAME, "--lora", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and err.count("\n") == 0, err


def test_duplicate_and_foreign_adapters_exit_2(adapters, capsys):
    d = adapters[0]["sql"]
    assert jaxtx_main(["serve", "--hf", str(FIXTURE), "--lora", f"a={d}", "--lora", f"a={d}"]) == 2
    assert "already taken" in capsys.readouterr().err
    rc = jaxtx_main(["serve", "--hf", str(FIXTURE), "--lora", f"other={OTHER_BASE_ADAPTER}"] + ENGINE_ARGS)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"--lora other={OTHER_BASE_ADAPTER}" in err and err.count("\n") == 0, err
