"""Build the Hugging Face PEFT adapters that tests/jaxtx/test_lora_peft.py compares jaxtx.lora against.

Needs torch + transformers + peft (`pip install -e .[peft]`); CI never runs this, it reads the committed outputs:

    python tools/make_peft_fixtures.py      # rewrites tests/fixtures/peft/

For each base in tests/fixtures/hf (llama, mistral, gpt2) PEFT adds a LoRA adapter with the config below, its A and
B are overwritten with N(0, 0.1) (a fresh adapter has B = 0 and would test nothing), and the folder holds PEFT's own
`save_pretrained` output plus `expected.npz`: `input_ids [2, 12]` -> `logits [2, 12, 128]` of base + adapter.

`gpt2_from_jaxtx` goes the other way: jaxtx makes the adapter (tests/jaxtx/test_lora_peft.py:jaxtx_gpt2_adapter,
separate a for q, k and v, a rank pattern), writes it with save_peft, and PEFT loads it and records its logits.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
HF = ROOT / "tests" / "fixtures" / "hf"
OUT = ROOT / "tests" / "fixtures" / "peft"

# name -> (base fixture, LoraConfig kwargs): together they cover all-linear targets, rank/alpha patterns (name and
# regex keys), rsLoRA, GPT-2's fused Conv1D c_attn (fan_in_fan_out) and a layers_to_transform subset.
VARIANTS = {
    "llama": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                            rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
                            alpha_pattern={"o_proj": 3.0})),
    "mistral": ("mistral", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
                                layers_to_transform=[1])),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                          rank_pattern={r"h\.0\.mlp\.c_proj": 2})),
}


def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(2, 128, size=(2, 12)).astype(np.int64)


def make(name: str) -> None:
    import peft
    import transformers
    base, kw = VARIANTS[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(HF / base, dtype=torch.float32,
                                                              attn_implementation="eager")
    pm = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.eval()
    x = ids()
    with torch.no_grad():
        logits = pm(input_ids=torch.from_numpy(x)).logits.numpy()
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(out)
    np.savez(out / "expected.npz", input_ids=x.astype(np.int32), logits=logits.astype(np.float32))
    print(name, "saved", sorted(p.name for p in out.iterdir()))


def make_from_jaxtx() -> None:
    import peft
    import transformers
    sys.path.insert(0, str(ROOT / "tests" / "jaxtx"))
    from test_lora_peft import jaxtx_gpt2_adapter  # the one definition, shared with the test

    from jaxtx.lora import save_peft
    model, params = jaxtx_gpt2_adapter()
    out = OUT / "gpt2_from_jaxtx"
    shutil.rmtree(out, ignore_errors=True)
    save_peft(model, params, out, base_model_name_or_path="tests/fixtures/hf/gpt2")
    base = transformers.AutoModelForCausalLM.from_pretrained(HF / "gpt2", dtype=torch.float32,
                                                             attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base, out)
    pm.eval()
    x = ids()
    with torch.no_grad():
        logits = pm(input_ids=torch.from_numpy(x)).logits.numpy()
    np.savez(out / "expected.npz", input_ids=x.astype(np.int32), logits=logits.astype(np.float32))
    print("gpt2_from_jaxtx", json.loads((out / "adapter_config.json").read_text())["rank_pattern"])


if __name__ == "__main__":
    import peft
    import transformers
    names = sys.argv[1:] or [*VARIANTS, "gpt2_from_jaxtx"]
    for n in names:
        make_from_jaxtx() if n == "gpt2_from_jaxtx" else make(n)
    (OUT / "README.md").write_text(
        f"# PEFT LoRA fixtures\n\nWritten by `python tools/make_peft_fixtures.py` with transformers "
        f"{transformers.__version__}, peft {peft.__version__}, torch {torch.__version__} (float32). See the tool's "
        "docstring for what each folder exercises. Tests read these files; they never need torch or peft.\n")
