"""Load a model + params + tokenizer for generation from a training run dir or a Hugging Face directory.

infer never imports train (imports flow core <- train, infer), so the run-dir format is read directly. What it relies
on (written by `jaxtx train`):
    RUN_DIR/config.yaml          resolved run config; its `model:` section lists every ModelConfig field (+ `preset`),
                                 `data.tokenizer` may name an external sentencepiece file
    RUN_DIR/tokenizer.model      sentencepiece model (used when data.tokenizer is null); PAD 0, UNK 1, BOS 2, EOS 3
    RUN_DIR/checkpoints/<step>/state   orbax pytree {"step", "params", "opt_state", ...}; only "params" is read
A Hugging Face directory goes through `jaxtx.hf.load`; its tokenizer is tokenizer.model / spiece.model
(sentencepiece) or tokenizer.json (the `tokenizers` library), if present.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from jaxtx import run_dir as run_dir_lib
from jaxtx.config import ConfigError


class LoadError(ValueError):
    """A model directory is missing something or is not a run dir / HF dir."""


@dataclasses.dataclass
class Loaded:
    model: Any
    params: Any
    tokenizer: Optional["TextTokenizer"]
    source: str  # "run" | "hf"
    step: Optional[int] = None


class TextTokenizer:
    """The few calls the CLI needs, over sentencepiece or HF `tokenizers`."""

    def __init__(self, sp=None, hf=None, eos_id=None, bos_id=None, special=()):
        self.sp, self.hf = sp, hf
        self.eos_id, self.bos_id = eos_id, bos_id
        self.special = {i for i in special if i is not None and i >= 0}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() if self.sp is not None else self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if self.sp is not None else self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # a model's vocab may be padded past the tokenizer's pieces: ids without a piece decode to nothing
        n = self.vocab_size
        ids = [int(i) for i in ids if int(i) not in self.special and 0 <= int(i) < n]
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids)

    @classmethod
    def from_sentencepiece(cls, path: Path) -> "TextTokenizer":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return cls(sp=sp, eos_id=sp.eos_id(), bos_id=sp.bos_id(), special=(sp.pad_id(), sp.bos_id(), sp.eos_id()))


def is_run_dir(path: Path) -> bool:
    return run_dir_lib.is_run_dir(path)


def load_run(run_dir, step: Optional[int] = None) -> Loaded:
    """Model, newest (or `step`) checkpoint params and tokenizer of a training run dir (format: jaxtx.run_dir)."""
    import jaxtx.model

    run_dir = Path(run_dir).absolute()
    if not is_run_dir(run_dir):
        raise LoadError(f"--run {run_dir}: not a training run dir (expected config.yaml and checkpoints/)")
    try:
        cfg, params, step = run_dir_lib.load_params(run_dir, step)
        _, resolved = run_dir_lib.run_config(run_dir)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    model = jaxtx.model.build(cfg)
    tok_path = (resolved.get("data") or {}).get("tokenizer") or run_dir / "tokenizer.model"
    tok = TextTokenizer.from_sentencepiece(Path(tok_path)) if Path(tok_path).exists() else None
    return Loaded(model, params, tok, "run", step)


def load_hf(hf_dir) -> Loaded:
    from jaxtx import hf

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise LoadError(f"--hf {hf_dir}: no config.json (expected a Hugging Face model directory)")
    model, params = hf.load(hf_dir)
    tok = None
    sp_file = next((hf_dir / n for n in ("tokenizer.model", "spiece.model") if (hf_dir / n).exists()), None)
    if sp_file is not None:  # Llama / Mistral ship tokenizer.model, T5 spiece.model
        tok = TextTokenizer.from_sentencepiece(sp_file)
    elif (hf_dir / "tokenizer.json").exists():
        try:
            import tokenizers
        except ImportError:
            tokenizers = None
        if tokenizers is not None:
            t = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
            conf = json.loads((hf_dir / "config.json").read_text())
            gen = hf_dir / "generation_config.json"
            gconf = json.loads(gen.read_text()) if gen.exists() else {}
            eos = gconf.get("eos_token_id", conf.get("eos_token_id"))
            eos = eos[0] if isinstance(eos, list) else eos
            bos = gconf.get("bos_token_id", conf.get("bos_token_id"))
            tok = TextTokenizer(hf=t, eos_id=eos, bos_id=bos, special=(eos, bos, conf.get("pad_token_id")))
    return Loaded(model, params, tok, "hf")


def load_any(path) -> Loaded:
    """A run dir or an HF dir, whichever `path` is (for --draft)."""
    p = Path(path)
    if is_run_dir(p):
        return load_run(p)
    if (p / "config.json").exists():
        return load_hf(p)
    raise LoadError(f"{p}: neither a training run dir (config.yaml + checkpoints/) nor an HF dir (config.json)")
