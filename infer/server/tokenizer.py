"""Tokenizers for the server: `tokenizer.json` through the `tokenizers` library (HF folders), sentencepiece (run dirs),
and incremental detokenization for streaming.

Special tokens are decided by the tokenizer's own settings, as transformers decides them: the tokenizer.json
post-processor (Llama's prepends <s>), overridden by `add_bos_token` / `add_eos_token` when tokenizer_config.json sets
them. The server adds none of its own. Chat prompts are encoded without special tokens (the template writes them),
as `apply_chat_template` does. Stop ids come from generation_config.json, else config.json (an int or a list).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence


class TokenizerError(ValueError):
    """A model directory's tokenizer files are missing or inconsistent."""


def _byte_level_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character a byte-level BPE piece uses for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """What the server needs from a tokenizer. Subclasses fill the fields and the four methods."""

    vocab_size: int  # pieces (the model's vocab may be larger: ids past this decode to nothing)
    eos_ids: tuple[int, ...] = ()
    special_ids: frozenset = frozenset()
    # special token strings a chat template may reference (bos_token, eos_token, ...)
    template_tokens: dict
    chat_template: Optional[str] = None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a single token stands for: a special token's name, b"" for ids without a piece."""
        raise NotImplementedError

    def guidance_tokenizer(self, n_vocab: int):
        """An llguidance.LLTokenizer over the model's n_vocab ids (ids without a piece are never allowed)."""
        raise NotImplementedError

    def token_str(self, token_id: int) -> str:
        """The token as the OpenAI API shows it in logprobs: its text, or `bytes:\\xNN..` when it is not valid UTF-8
        on its own (a piece of a multi-byte character)."""
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class HFTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library."""

    def __init__(self, tokenizer_json: str, config: dict, eos_ids: Sequence[int]):
        from tokenizers import Tokenizer as RustTokenizer, processors

        self._json = tokenizer_json
        self.tok = RustTokenizer.from_str(tokenizer_json)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        spec = json.loads(tokenizer_json)
        self.special_ids = frozenset(t["id"] for t in spec.get("added_tokens", []) if t.get("special"))
        self.template_tokens = {k: _token_content(config.get(k)) for k in
                                ("bos_token", "eos_token", "unk_token", "pad_token")}
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if add_bos is not None or add_eos is not None:
            # as transformers' update_post_processor: the config's flags replace what tokenizer.json would add
            parts = []
            for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
                tok = self.template_tokens[name]
                if flag and (tok is None or self.tok.token_to_id(tok) is None):
                    raise TokenizerError(f"tokenizer_config.json: add_{name[:3]}_token is set but {name}={tok!r} "
                                         "is not a token of tokenizer.json")
                parts.append((tok, self.tok.token_to_id(tok)) if flag else None)
            bos, eos = parts
            single = " ".join(([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else []))
            pair = single + " " + " ".join(([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos
                                                                                         else []))
            self.tok.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[p for p in (bos, eos) if p])
        self.eos_ids = tuple(eos_ids)
        decoder = (spec.get("decoder") or {}).get("type")
        byte_level = decoder == "ByteLevel" or (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
        self._byte_table = _byte_level_table() if byte_level else None
        self._piece_cache: dict[int, bytes] = {}

    def encode(self, text, *, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens=True):
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id):
        token_id = int(token_id)
        if token_id in self._piece_cache:
            return self._piece_cache[token_id]
        piece = self.tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if piece is None:
            out = b""
        elif token_id in self.special_ids:  # shown by name in logprobs, as tiktoken shows <|endoftext|>
            out = piece.encode("utf-8")
        elif self._byte_table is not None and all(c in self._byte_table for c in piece):
            out = bytes(self._byte_table[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            out = bytes([int(piece[3:5], 16)])
        else:  # metaspace pieces (Llama-2 / Mistral tokenizer.json): U+2581 is a space
            out = piece.replace("\u2581", " ").encode("utf-8")
        self._piece_cache[token_id] = out
        return out

    def guidance_tokenizer(self, n_vocab):
        import llguidance
        return llguidance.LLTokenizer(self._json, n_vocab=max(n_vocab, self.vocab_size),
                                      eos_token=list(self.eos_ids) or None)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. `prefix_ids` are prepended by encode(add_special_tokens=True): [bos] for an HF folder
    whose tokenizer_config says add_bos_token (LlamaTokenizer's default); for a jaxtx run dir, the prefix of the
    PromptLayout its training recorded (jaxtx.run_dir), so the server prompts a run exactly as training laid it out."""

    def __init__(self, path: Path, *, prefix_ids: Sequence[int] = (), eos_ids: Sequence[int] = (),
                 template_tokens: Optional[dict] = None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.prefix_ids = list(prefix_ids)
        self.eos_ids = tuple(eos_ids)
        self.special_ids = frozenset(i for i in range(self.vocab_size)
                                     if self.sp.is_control(i) or self.sp.is_unknown(i))
        piece = lambda i: self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None  # noqa: E731
        self.template_tokens = template_tokens or {"bos_token": piece(self.sp.bos_id()),
                                                   "eos_token": piece(self.sp.eos_id())}

    def encode(self, text, *, add_special_tokens=True):
        return (self.prefix_ids if add_special_tokens else []) + list(self.sp.encode(text))

    def decode(self, ids, *, skip_special_tokens=True):
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        # sentencepiece drops control pieces when decoding: write them out by hand between the decoded runs
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def token_bytes(self, token_id):
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            return b""
        if token_id in self.special_ids:
            return self.sp.id_to_piece(token_id).encode("utf-8")
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])
        return self.sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")

    def _raw_processor(self):
        """The same model without its text normalization: llguidance tokenizes grammar fragments (`{"`) mid-text,
        where sentencepiece's dummy-prefix space and whitespace folding would change the bytes."""
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def guidance_tokenizer(self, n_vocab):
        import llguidance

        n = max(n_vocab, self.vocab_size)
        # llguidance wants every id's bytes; special tokens and ids past the pieces get the 0xFF marker it uses for
        # special tokens (a grammar never allows them)
        tokens = [self.token_bytes(i) if i < self.vocab_size and i not in self.special_ids
                  else b"\xff" + str(i).encode() for i in range(n)]

        raw = self._raw_processor()

        class _Wrapped:
            eos_token_id = self.eos_ids[0] if self.eos_ids else self.sp.eos_id()
            bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
            special_token_ids = sorted(self.special_ids)

            def __init__(w):
                w.tokens = tokens

            def __call__(w, s):
                return list(raw.encode(s if isinstance(s, str) else s.decode("utf-8", "replace")))

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), n_vocab=n,
                                      eos_token=list(self.eos_ids) or None)


def _token_content(tok) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _eos_ids(folder: Path) -> list[int]:
    """Stop ids as transformers' generate uses them: generation_config.json first, then config.json."""
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def read_chat_template(folder: Path, config: dict) -> Optional[str]:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of {name, template}
    where the one named "default" is the chat template, as transformers picks it)."""
    f = folder / "chat_template.jinja"
    if f.exists():
        return f.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" not in named:
            raise TokenizerError(f"{folder}/tokenizer_config.json: chat_template is a list of templates "
                                 f"{sorted(map(str, named))} without one named 'default'")
        t = named["default"]
    return t if isinstance(t, str) else None


def load_hf_tokenizer(folder) -> Tokenizer:
    """The tokenizer of an HF model folder: tokenizer.json, else tokenizer.model (sentencepiece)."""
    folder = Path(folder)
    cfg_file = folder / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    eos = _eos_ids(folder)
    if (folder / "tokenizer.json").exists():
        tok: Tokenizer = HFTokenizer((folder / "tokenizer.json").read_text(encoding="utf-8"), config, eos)
    elif (folder / "tokenizer.model").exists():
        sp = SentencePieceTokenizer(folder / "tokenizer.model", eos_ids=eos)
        tokens = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        sp.template_tokens = {k: v for k, v in tokens.items() if v is not None} or sp.template_tokens
        if config.get("add_bos_token", True) and sp.sp.bos_id() >= 0:  # LlamaTokenizer adds <s> by default
            sp.prefix_ids = [sp.sp.bos_id()]
        if not sp.eos_ids and sp.sp.eos_id() >= 0:
            sp.eos_ids = (sp.sp.eos_id(),)
        tok = sp
    else:
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model; the server needs a tokenizer")
    tok.chat_template = read_chat_template(folder, config)
    return tok


def load_run_tokenizer(path, prefix_ids: Sequence[int] = ()) -> Tokenizer:
    """A jaxtx run dir's sentencepiece model (PAD 0, UNK 1, BOS 2, EOS 3). `prefix_ids`: the run's recorded
    PromptLayout prefix (jaxtx.run_dir; empty for every objective train has today). EOS ends generation."""
    sp = SentencePieceTokenizer(Path(path), prefix_ids=list(prefix_ids))
    eos = sp.sp.eos_id()
    if eos >= 0:
        sp.eos_ids = (eos,)
    return sp


class IncrementalDecoder:
    """Turns a growing token list into text deltas that never split a multi-byte character.

    Decodes a short window of the newest tokens and releases its text up to a trailing U+FFFD run (the bytes of an
    incomplete UTF-8 character). Once the window ends on a complete character it slides forward, keeping the last
    released tokens as context: sentencepiece drops the leading space of the first piece of a decode, so the window
    never starts at a token whose text is still to be released (it starts a few prompt tokens back at first)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), context: int = 5):
        self.tok = tokenizer
        self.ids = [int(i) for i in list(prompt_ids)[-context:]]
        self.start = 0  # window start
        self.mark = len(self.ids)  # tokens before this were complete at the last slide
        self.sent = len(self.tok.decode(self.ids))  # characters of the window's text already released (or prompt)

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids += [int(i) for i in new_ids]
        text = self.tok.decode(self.ids[self.start:])
        stable = len(text.rstrip("\ufffd"))
        out = text[self.sent:stable] if stable > self.sent else ""
        self.sent = max(self.sent, stable)
        if stable == len(text) and len(self.ids) > self.mark:  # complete: slide the window
            window = self.tok.decode(self.ids[self.mark:])
            # only onto tokens that already show text: a window starting at tokens without text (special ids, ids
            # past the tokenizer) would make a later piece its first, and sentencepiece drops that piece's space
            if window:
                self.start, self.mark, self.sent = self.mark, len(self.ids), len(window)
        return out

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end decodes to U+FFFD, as a full decode does)."""
        text = self.tok.decode(self.ids[self.start:])
        out = text[self.sent:]
        self.start = self.mark = len(self.ids)
        self.sent = 0
        return out
