"""Text <-> ids over a sentencepiece model or an HF `tokenizers` file: the one wrapper train and infer share.

train adds training and the T5 sentinels on top (jaxtx.train.tokenizer.Tokenizer); infer loads whichever file a run dir
or an HF folder holds (jaxtx.run_dir.TokenizerFile). `encode` adds nothing around the text: the ids a model expects
around it are the run's PromptLayout (jaxtx.run_dir).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


class TextTokenizer:
    def __init__(self, sp=None, hf=None, eos_id=None, bos_id=None, special=()):
        self.sp, self.hf = sp, hf
        self.eos_id, self.bos_id = eos_id, bos_id
        self.special = {int(i) for i in special if i is not None and i >= 0}  # dropped by decode

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() if self.sp is not None else self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if self.sp is not None else self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # a model's vocab may be padded past the tokenizer's pieces: ids without a piece decode to nothing
        n = self.vocab_size
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in self.special and 0 <= int(i) < n]
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids)

    @classmethod
    def from_sentencepiece(cls, path: Optional[Path] = None, proto: Optional[bytes] = None) -> "TextTokenizer":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(path)) if proto is None else \
            spm.SentencePieceProcessor(model_proto=proto)
        return cls(sp=sp, eos_id=sp.eos_id(), bos_id=sp.bos_id(), special=(sp.pad_id(), sp.bos_id(), sp.eos_id()))

    @classmethod
    def from_file(cls, t) -> Optional["TextTokenizer"]:
        """A jaxtx.run_dir.TokenizerFile, or None when there is none or the `tokenizers` package is missing."""
        if t is None:
            return None
        if t.sentencepiece:
            return cls.from_sentencepiece(t.path)
        try:
            import tokenizers
        except ImportError:
            return None
        return cls(hf=tokenizers.Tokenizer.from_file(str(t.path)), eos_id=t.eos_id, bos_id=t.bos_id,
                   special=(t.eos_id, t.bos_id, t.pad_id))
