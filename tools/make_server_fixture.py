"""Build tests/fixtures/server/llama_chat: a tiny HF-format Llama with a trained tokenizer.json and a chat template.

The `jaxtx serve` tests start a real server on it, so it holds everything an HF chat model directory holds:

    config.json, model.safetensors     jaxtx.hf.save of a random-weight Llama (V=320, D=32, 2 layers, GQA 4/2)
    generation_config.json             eos_token_id [<|im_end|>, </s>] (two stop ids, as chat models ship them)
    tokenizer.json                     byte-level BPE trained here with `tokenizers` on a small built-in corpus;
                                       its post-processor prepends <s> (as Llama's does), 300 pieces
    tokenizer_config.json              special tokens + a ChatML chat template (loop controls, raise_exception)

The model's vocab (320) is larger than the tokenizer's (300), as in checkpoints whose embedding is padded: the server
must never emit (and structured output must mask) the 20 ids without a piece. Weights use std 0.3 so greedy decoding
of a random model does not collapse onto one token. No network, no torch; deterministic (fixed seeds, the trainer is
deterministic for a fixed corpus).

    python tools/make_server_fixture.py          # rewrites tests/fixtures/server/llama_chat/
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "server" / "llama_chat"
TOKENIZER_PIECES = 300
MODEL_VOCAB = 320
SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.first and message['role'] == 'assistant' %}"
    "{{ raise_exception('The first message cannot be from the assistant') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A few hundred words of mixed text: English, code, JSON (so JSON punctuation gets merged pieces) and non-ASCII
# (so multi-byte characters span several byte-level tokens and streaming detokenization is exercised).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital.",
    "def main():\n    print('hello world')\n    return 0\n\nif __name__ == '__main__':\n    main()\n",
    '{"name": "Alice", "age": 30, "city": "Paris", "tags": ["a", "b"], "ok": true, "score": 1.5, "none": null}',
    '{"id": 12, "items": [1, 2, 3], "nested": {"key": "value", "flag": false}}',
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14159 -42",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, \u00fcber Stra\u00dfe. "
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002 "
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440. \U0001F600 \U0001F680 emoji.",
    "You are a helpful assistant. Answer the question briefly and accurately.",
    "system user assistant message content role",
] * 3


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_PIECES, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # Llama-style: every encode(add_special_tokens=True) starts with <s>; chat prompts already carry it (the template
    # writes bos_token) and are encoded without special tokens, as transformers' apply_chat_template does.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    assert tok.get_vocab_size() == TOKENIZER_PIECES, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIAL] == [0, 1, 2, 3]
    return tok


def build_model():
    import jax

    from jaxtx import model as model_lib
    from jaxtx.config import load_model_config

    cfg = load_model_config("tiny", [f"vocab_size={MODEL_VOCAB}", "d_model=32", "n_heads=4", "n_kv_heads=2",
                                     "d_ff=64", "n_layers=2", "init_std=0.3", "max_seq_len=256",
                                     "tie_embeddings=false"])
    model = model_lib.build(cfg)
    return model, model_lib.init_params(model, jax.random.key(0))


def main() -> None:
    from jaxtx import hf

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    model, params = build_model()
    hf.save(model, params, OUT)
    conf = json.loads((OUT / "config.json").read_text())
    conf.update(bos_token_id=0, eos_token_id=3)
    (OUT / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (OUT / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [3, 1]}, indent=2)
                                                + "\n")
    tok = build_tokenizer()
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "</s>",
        "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for i, s in enumerate(SPECIAL)},
        "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    print(f"wrote {OUT}: " + ", ".join(f"{p.name} {p.stat().st_size // 1024} KiB" for p in sorted(OUT.iterdir())))


if __name__ == "__main__":
    main()
