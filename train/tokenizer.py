"""Sentencepiece BPE tokenizer: trained in memory on the corpus, saved in the run dir, lossless.

Lossless round trip (decode(encode(s)) == s for any string) needs identity normalization, no whitespace collapsing, no
dummy prefix, and byte fallback so no character is ever unknown. Newlines are a user-defined symbol so source code
does not spend a byte-fallback token on every line end.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from jaxtx.config import ConfigError
from jaxtx.tokenizer import TextTokenizer

# ids fixed by our training arguments, so every tokenizer we train has the same specials in the same slots
PAD, UNK, BOS, EOS = 0, 1, 2, 3
N_SENTINELS = 100  # T5 span corruption sentinels <extra_id_0..99>, kept at the top of the vocabulary
MASK_PIECE = "<mask>"
MASK_ID = 5  # after the 4 specials and "\n" (user_defined_symbols keep their order)


class Tokenizer(TextTokenizer):
    """A sentencepiece model this run trained (or data.tokenizer): the shared TextTokenizer plus what training needs
    (batch encoding, T5 sentinels, the MLM mask id, the model bytes to save in the run dir)."""

    def __init__(self, proto: bytes):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        super().__init__(sp=sp, eos_id=sp.eos_id(), bos_id=sp.bos_id(), special=(sp.pad_id(), sp.bos_id(), sp.eos_id()))
        self.proto = proto
        self.mask_id = self.sp.piece_to_id(MASK_PIECE)  # MASK_ID for our tokenizers; looked up for external ones

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=2)

    def sentinel(self, i: int) -> int:
        """<extra_id_i>: the i-th T5 sentinel."""
        return self.sp.piece_to_id(f"<extra_id_{i}>")

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.proto)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: file not found")
        try:
            return cls(p.read_bytes())
        except RuntimeError as e:  # sentencepiece cannot parse it
            raise ConfigError(f"{p}: not a sentencepiece model ({str(e).splitlines()[0][:200]})") from None


def _chunks(texts: Iterable[str], max_chars: int, piece: int = 2000):
    """Training 'sentences': fixed-size slices of the documents, newlines kept, up to max_chars in total."""
    seen = 0
    for t in texts:
        for i in range(0, len(t), piece):
            s = t[i:i + piece]
            yield s
            seen += len(s)
            if seen >= max_chars:
                return


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int = 3_000_000) -> Tokenizer:
    """BPE with at most vocab_size pieces (specials and sentinels included), trained on the first max_chars of texts.

    A small corpus may yield fewer pieces than asked (hard_vocab_limit=False); the model's vocabulary may be larger."""
    if vocab_size < 256 + 4 + N_SENTINELS + 64:
        raise ConfigError(f"model.vocab_size={vocab_size}: a byte-fallback BPE needs at least "
                          f"{256 + 4 + N_SENTINELS + 64} pieces (256 bytes, specials, sentinels, merges)")
    out = io.BytesIO()
    user = ["\n", MASK_PIECE] + [f"<extra_id_{i}>" for i in range(N_SENTINELS)]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts, max_chars), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=user,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, max_sentence_length=4096, character_coverage=1.0,
            num_threads=2, minloglevel=2, hard_vocab_limit=False)
    except RuntimeError as e:  # e.g. a corpus too small for the requested vocabulary
        raise ConfigError(f"tokenizer training failed for model.vocab_size={vocab_size}: {e}") from e
    return Tokenizer(out.getvalue())
