"""Train's end-of-run samples are what `jaxtx generate` answers on the same run dir: both run core's static-cache
decode loop (jaxtx.decode), so the in-memory model at the end of training and the checkpoint `generate --run` loads
give the same greedy tokens, prompt by prompt. A tiny SFT run (6 steps) on synthetic data, in process."""
import pytest
from train_helpers import ONE_DEVICE, TINY_MODEL

from jaxtx.cli import main
from jaxtx.train.tokenizer import EOS

N_NEW = 8
ARGS = [*TINY_MODEL, *ONE_DEVICE, "data.source=synthetic", "data.n_examples=300", "train.objective=sft",
        "train.seq_len=32", "train.batch_size=8", "train.steps=6", "train.log_every=3",
        "train.eval_every=6", "train.ckpt_every=6", "train.eval_batches=1", "train.progress=false",
        "train.samples=4", f"train.sample_tokens={N_NEW}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import jaxtx.train.cli
    from jaxtx.train.config import load_run_config
    from jaxtx.train.loop import train
    out_dir = tmp_path_factory.mktemp("samples") / "run"
    with pytest.MonkeyPatch.context() as mp:  # keep the test process's own jax config
        mp.setattr(jaxtx.train.cli, "setup_jax_cache", lambda: None)
        out = train(load_run_config("configs/tiny.yaml", [*ARGS, f"out_dir={out_dir}"]), log=lambda *a: None)
    assert out["status"] == "done" and len(out["samples"]) == 4
    return out


def test_end_of_run_samples_equal_generate_on_the_run_dir(trained, tmp_path, capsys):
    from jaxtx.infer import for_decoding, generate
    from jaxtx.infer.loading import load_run
    from jaxtx.train.sample import greedy_generate

    tok = trained["tokenizer"]
    prompts = [tok.encode(p) for p, _ in trained["samples"]]
    assert all(tok.encode(tok.decode(p)) == p for p in prompts)  # the CLI below sees the same prompt ids
    ours = greedy_generate(trained["model"], trained["params"], prompts, N_NEW, eos_id=EOS)
    assert [tok.decode(o) for o in ours] == [s for _, s in trained["samples"]]

    # the Python API on the checkpoint, laid out as `jaxtx generate` lays it out (unrolled layers)
    loaded = load_run(trained["run_dir"])
    model, params = for_decoding(loaded.model, loaded.params)
    assert generate(model, params, prompts, max_new_tokens=N_NEW, eos_id=EOS).tokens == ours

    # the CLI, all prompts in one batch (`=== i` before each completion)
    f = tmp_path / "prompts.txt"
    f.write_text("".join(tok.decode(p) + "\n" for p in prompts))
    capsys.readouterr()
    assert main(["generate", "--run", trained["run_dir"], "--prompts-file", str(f), "--max-new-tokens",
                 str(N_NEW)]) == 0
    blocks = capsys.readouterr().out.split("=== ")[1:]
    assert [b.split("\n", 1)[1].rstrip("\n") for b in blocks] == [tok.decode(o).rstrip("\n") for o in ours]
    assert sum(len(o) for o in ours) > len(ours)  # 6 steps in, the model does not stop at once: a real comparison
