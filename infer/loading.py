"""Load a model + params + tokenizer + prompt layout for generation, from a jaxtx run dir or a Hugging Face directory.

A run dir (written by `jaxtx train` or `jaxtx convert --from-hf`) is read only through jaxtx.run_dir, which owns its
layout. A Hugging Face directory goes through `jaxtx.hf.load`; its tokenizer is tokenizer.model / spiece.model
(sentencepiece) or tokenizer.json (the `tokenizers` library), if present. Either way `Loaded.prompt_layout` says which
ids go around a user's text: `loaded.prompt_layout.apply(tok.encode(text))` is what the model is fed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from jaxtx import run_dir as rd
from jaxtx.config import ConfigError
from jaxtx.tokenizer import TextTokenizer  # noqa: F401 (re-exported: infer's callers import it from here)


class LoadError(ValueError):
    """A model directory is missing something or is not a run dir / HF dir."""


@dataclasses.dataclass
class Loaded:
    model: Any
    params: Any
    tokenizer: Optional["TextTokenizer"]
    source: str  # "run" | "hf"
    step: Optional[int] = None
    prompt_layout: rd.PromptLayout = rd.PromptLayout()  # ids around a user's text, as training / the tokenizer had it
    note: Optional[str] = None  # something a user should know about how the model is prompted


def is_run_dir(path: Path) -> bool:
    return rd.is_run_dir(path)


def load_run(run_dir, step: Optional[int] = None) -> Loaded:
    """Model, newest (or `step`) checkpoint params, tokenizer and prompt layout of a jaxtx run dir."""
    import jaxtx.model

    run_dir = Path(run_dir).absolute()
    if not is_run_dir(run_dir):
        raise LoadError(f"--run {run_dir}: not a jaxtx run dir (expected config.yaml and checkpoints/)")
    try:
        cfg, params, step = rd.load_params(run_dir, step)
        _, resolved = rd.run_config(run_dir)
        layout, note = rd.read_prompt_layout(run_dir), None
    except ConfigError as e:
        raise LoadError(str(e)) from None
    tok = TextTokenizer.from_file(rd.tokenizer_file(run_dir, resolved))
    if layout is None:
        # run dirs from before layouts were recorded: jaxtx train has always laid rows out this way (nothing before a
        # decoder's text; EOS after a T5 encoder's)
        eos = tok.eos_id if tok is not None and tok.eos_id is not None and tok.eos_id >= 0 else None
        layout = rd.PromptLayout(suffix=(eos,)) if cfg.kind == "encoder_decoder" and eos is not None else \
            rd.PromptLayout()
        note = (f"{run_dir} records no prompt layout (an older jaxtx wrote it); prompting the way jaxtx train lays "
                f"out rows: {layout.to_dict()}")
    return Loaded(jaxtx.model.build(cfg), params, tok, "run", step, layout, note)


def load_hf(hf_dir) -> Loaded:
    from jaxtx import hf

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise LoadError(f"--hf {hf_dir}: no config.json (expected a Hugging Face model directory)")
    model, params = hf.load(hf_dir)
    try:
        tok, layout = TextTokenizer.from_file(rd.hf_tokenizer_file(hf_dir)), rd.hf_prompt_layout(hf_dir)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    return Loaded(model, params, tok, "hf", prompt_layout=layout)


def load_any(path) -> Loaded:
    """A run dir or an HF dir, whichever `path` is (for --draft)."""
    p = Path(path)
    if is_run_dir(p):
        return load_run(p)
    if (p / "config.json").exists():
        return load_hf(p)
    raise LoadError(f"{p}: neither a jaxtx run dir (config.yaml + checkpoints/) nor an HF dir (config.json)")
