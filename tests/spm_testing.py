"""Test helper: a tiny BPE sentencepiece model trained in memory (tests/ is on sys.path through tests/conftest.py)."""
import io

import sentencepiece as spm

TEXT = "hello world, the quick brown fox jumps over the lazy dog\n"


def tiny_sentencepiece(vocab_size: int, *, code_lines: int = 100, pad_id=0, unk_id=1, bos_id=2, eos_id=3) -> bytes:
    """tokenizer.model bytes trained on `code_lines` copies of a two-line function and 50 of an English line;
    identity normalization, whitespace kept as is (so code round-trips)."""
    text = "def main():\n    return 1\n" * code_lines + TEXT * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines(keepends=True)), model_writer=buf,
                                   vocab_size=vocab_size, model_type="bpe", pad_id=pad_id, unk_id=unk_id,
                                   bos_id=bos_id, eos_id=eos_id, byte_fallback=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return buf.getvalue()
