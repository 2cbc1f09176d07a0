"""Data: documents -> tokenizer -> fixed-length rows -> a grain iterator whose state goes into every checkpoint.

Sources: the Python standard library's own .py files (the zero-download default), plain text files (one file = one
document), and JSON Lines (one record = one document, or prompt/response(/chosen/rejected) records for SFT and DPO).
Documents are read in sorted order and every k-th one is held out for eval, so the split depends on nothing but the
corpus. Rows are built once in memory (fine for the corpora this tool targets; a sharded on-disk source would replace
`build_rows` for web-scale data) and grain gives a seeded, per-epoch reshuffled, checkpointable stream over them.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import sysconfig
from pathlib import Path

import grain
import numpy as np

from jaxtx.config import ConfigError, ModelConfig
from jaxtx.train import packing
from jaxtx.train.config import JSONL_SUFFIXES, RunConfig
from jaxtx.train.tokenizer import N_SENTINELS, PAD, Tokenizer, train_tokenizer

TOKENIZER_FILE = "tokenizer.model"


# ------------------------------------------------------------------------------------------------ reading
def stdlib_files() -> list[Path]:
    """The stdlib's .py sources in a fixed order, without its test suites, installed third-party packages and
    generated data files (codec tables in encodings/, the help-text blob in pydoc_data/): digit-split hex tables are
    ~12% of the bytes but far more of the tokens, and a small model trained on them samples code tables."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def _files(path: str) -> list[Path]:
    """data.path as files: a file, a folder (every file below it, hidden ones skipped) or a glob (`**` recurses)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise ConfigError(f"data.path={path!r}: the folder holds no files")
        return files
    if p.is_file():  # before globbing: a file name may contain [ or *
        return [p]
    if not glob.has_magic(str(p)):
        raise ConfigError(f"data.path={path!r}: no such file or folder")
    files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise ConfigError(f"data.path={path!r}: no file matches")
    return files


def _read_bytes(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        raise ConfigError(f"{f}: cannot read ({e.strerror or e})") from e


def read_text_file(f: Path) -> str:
    """The file as text: refused unless it is UTF-8 without NUL bytes (binary data decoded with replacement
    characters would train the model on noise without a word)."""
    raw = _read_bytes(f)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{f}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at byte offset {e.start}); "
                          "data.source=text reads UTF-8 files only") from e
    nul = text.find("\0")
    if nul >= 0:
        raise ConfigError(f"{f}: NUL byte at byte offset {len(text[:nul].encode())}: a binary file, not text")
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content


def _jsonl_lines(f: Path):
    """(line number, text) of each line; a line that is not UTF-8 is refused with its file, line and byte offset."""
    offset = 0
    for i, raw in enumerate(_read_bytes(f).split(b"\n"), 1):
        try:
            yield i, raw.decode("utf-8").removeprefix("\ufeff" if i == 1 else "")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{f}:{i}: not UTF-8 (invalid byte at byte offset {offset + e.start} of the file); "
                              "JSON Lines files must be UTF-8") from e
        offset += len(raw) + 1


def synthetic_records(d, seed: int) -> list[dict]:
    """Digit-string tasks: prompt "reverse 38472 =" -> response " 27483"; `rejected` is a wrong answer (for DPO)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(d.n_examples):
        s = "".join(rng.choice(list("0123456789"), rng.integers(d.min_digits, d.max_digits + 1)))
        ans = {"reverse": s[::-1], "copy": s, "sort": "".join(sorted(s))}[d.task]
        wrong = "".join(rng.permutation(list(ans))) if len(set(ans)) > 1 else ans + "0"
        if wrong == ans:
            wrong = ans[1:] + ans[0] if ans[1:] + ans[0] != ans else ans + "0"
        out.append({"prompt": f"{d.task} {s} =", "response": f" {ans}", "rejected": f" {wrong}"})
    return out


def read_documents(cfg: RunConfig) -> list:
    """Strings for causal/mlm/span; dicts with prompt/response(/chosen/rejected) strings for sft/dpo."""
    d, obj = cfg.data, cfg.train.objective
    if d.source == "stdlib":
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    elif d.source == "synthetic":
        recs = synthetic_records(d, cfg.train.seed)
        if obj == "sft":
            docs = [{d.prompt_field: r["prompt"], d.response_field: r["response"]} for r in recs]
        elif obj == "dpo":
            docs = [{d.prompt_field: r["prompt"], d.chosen_field: r["response"], d.rejected_field: r["rejected"]}
                    for r in recs]
        else:
            docs = [r["prompt"] + r["response"] for r in recs]
    elif d.source == "text":
        files = _files(d.path)
        jsonl = [f for f in files if f.name.lower().endswith(JSONL_SUFFIXES)]
        if jsonl:  # a glob or folder that reaches JSON Lines files: their JSON syntax would be trained on as text
            raise ConfigError(f"data.source='text' would read {jsonl[0]} (JSON Lines) as plain text: set "
                              "data.source=jsonl, or narrow data.path to the text files")
        docs = [read_text_file(p) for p in files]
    else:
        fields = {"sft": [d.prompt_field, d.response_field], "dpo": [d.prompt_field, d.chosen_field, d.rejected_field]}
        need = fields.get(obj, [d.text_field])
        docs = []
        for f in _files(d.path):
            for i, line in _jsonl_lines(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{f}:{i}: not valid JSON ({e.msg}, column {e.colno})") from e
                if not isinstance(rec, dict):
                    raise ConfigError(f"{f}:{i}: expected a JSON object per line, got {type(rec).__name__}")
                missing = [k for k in need if not isinstance(rec.get(k), str)]
                if missing:
                    raise ConfigError(f"{f}:{i}: record has no string field(s) {missing} (objective {obj!r})")
                docs.append(rec[need[0]] if len(need) == 1 else {k: rec[k] for k in need})
    if d.max_chars:
        docs = _truncate(docs, d.max_chars)
    if not docs or all(not _text_of(x) for x in docs):
        raise ConfigError(f"data: the corpus is empty (source={d.source!r}, path={d.path!r})")
    return docs


def _text_of(doc) -> str:
    return doc if isinstance(doc, str) else "".join(doc.values())


def _truncate(docs: list, max_chars: int) -> list:
    out, seen = [], 0
    for x in docs:
        if seen >= max_chars:
            break
        out.append(x)
        seen += len(_text_of(x))
    return out


def split(docs: list, eval_fraction: float) -> tuple[list, list]:
    """Every k-th document (k = round(1/eval_fraction)) goes to eval; at least one on each side. A single text
    document is split instead: its last eval_fraction of characters (from a line start) is the eval document."""
    if len(docs) == 1 and isinstance(docs[0], str):  # one text file (a book, a log): hold out its tail, cut at a line
        text = docs[0]
        at = int(len(text) * (1 - eval_fraction))
        cut = text.rfind("\n", 0, at) + 1 or at
        if 0 < cut < len(text):
            return [text[:cut]], [text[cut:]]
    if len(docs) < 2:
        raise ConfigError(f"data: {len(docs)} document(s); need at least 2 to hold one out for eval")
    k = max(2, round(1 / eval_fraction))
    ev = [x for i, x in enumerate(docs) if i % k == k - 1] or docs[-1:]
    tr = [x for i, x in enumerate(docs) if i % k != k - 1] if len(ev) < len(docs) else docs[:-1]
    return tr, ev


# ------------------------------------------------------------------------------------------------ tokenizer
def get_tokenizer(cfg: RunConfig, model_cfg: ModelConfig, train_docs: list, run_dir: Path | None) -> Tokenizer:
    """data.tokenizer if given, else the run dir's (a resumed run reuses it), else train one and save it there."""
    saved = run_dir / TOKENIZER_FILE if run_dir is not None else None
    if cfg.data.tokenizer:
        try:
            tok = Tokenizer.load(cfg.data.tokenizer)
        except (ConfigError, OSError) as e:  # Tokenizer.load: "<path>: not a sentencepiece model (...)" / not found
            reason = str(e).removeprefix(f"{Path(cfg.data.tokenizer)}: ")
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: {' '.join(reason.split())}") from None
    elif saved is not None and saved.exists():
        tok = Tokenizer.load(saved)
    else:
        tok = train_tokenizer((_text_of(x) for x in train_docs), model_cfg.vocab_size, cfg.data.tokenizer_train_chars)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} pieces but model.vocab_size={model_cfg.vocab_size}: "
                          "token ids would index past the embedding table")
    if saved is not None and not saved.exists():
        saved.parent.mkdir(parents=True, exist_ok=True)
        tok.save(saved)
    return tok


# ------------------------------------------------------------------------------------------------ rows
def build_rows(docs: list, tok: Tokenizer, cfg: RunConfig) -> dict[str, np.ndarray]:
    """Fixed-length rows for the objective (formats in packing.py)."""
    t, T = cfg.train, cfg.train.seq_len
    if t.objective in ("sft", "dpo"):
        prompts = tok.encode_batch([x[cfg.data.prompt_field] for x in docs])
        keys = [cfg.data.response_field] if t.objective == "sft" else [cfg.data.chosen_field, cfg.data.rejected_field]
        rows = {}
        for key, prefix in zip(keys, ["", "rejected_"] if t.objective == "dpo" else [""]):
            resp = tok.encode_batch([x[key] for x in docs])
            for k, v in packing.prompt_response_rows(list(zip(prompts, resp)), T).items():
                rows[prefix + k] = v
        return rows
    ids = tok.encode_batch(docs)
    if t.objective == "causal":
        return packing.pack_documents(ids, T)
    if t.objective == "mlm":
        return packing.chunk_documents(ids, T)
    raw_len, _ = packing.span_raw_length(T, t.noise_density, t.mean_span)
    rows = packing.chunk_documents(ids, raw_len)
    return {"tokens": rows["tokens"], "length": rows["segment_ids"].sum(1).astype(np.int32)}


def span_target_len(cfg: RunConfig) -> int:
    t = cfg.train
    return t.target_len or packing.span_raw_length(t.seq_len, t.noise_density, t.mean_span)[1]


def make_span_fn(cfg: RunConfig, tok: Tokenizer):
    """Row {tokens, length} + rng -> T5 encoder/decoder arrays of fixed lengths (seq_len, target_len)."""
    t, Ti, To = cfg.train, cfg.train.seq_len, span_target_len(cfg)
    sentinels = np.array([tok.sentinel(i) for i in range(N_SENTINELS)], np.int32)

    def fn(row, rng: np.random.Generator):
        inp, tgt = packing.span_corrupt(row["tokens"], int(row["length"]), sentinels, t.noise_density, t.mean_span,
                                        rng)
        inp, tgt = inp[:Ti], tgt[:To]
        out = {k: np.full(n, PAD, np.int32) for k, n in
               [("inputs", Ti), ("input_mask", Ti), ("decoder_inputs", To), ("targets", To), ("target_mask", To)]}
        out["inputs"][:len(inp)] = inp
        out["input_mask"][:len(inp)] = 1
        out["targets"][:len(tgt)] = tgt
        out["target_mask"][:len(tgt)] = 1
        out["decoder_inputs"][1:len(tgt)] = tgt[:-1]  # shifted right; decoder start token = PAD (as in T5)
        return out
    return fn


class _Rows:
    """A random-access source over a dict of equal-length arrays (one record = one row of each)."""

    def __init__(self, rows: dict[str, np.ndarray], shard: tuple[int, int] = (0, 1)):
        i, n = shard
        self.rows = {k: v[i::n] for k, v in rows.items()}
        self.n = len(next(iter(self.rows.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.rows.items()}


def train_iterator(rows, cfg: RunConfig, batch_size: int, span_fn=None, shard=(0, 1)):
    """Endless, per-epoch reshuffled (by train.seed) batches; `it.get_state()` / `it.set_state()` are JSON-able."""
    ds = grain.MapDataset.source(_Rows(rows, shard)).shuffle(seed=cfg.train.seed).repeat()
    if span_fn is not None:
        ds = ds.random_map(span_fn, seed=cfg.train.seed + 1)
    return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


def eval_batches(rows, cfg: RunConfig, batch_size: int, span_fn=None, shard=(0, 1)) -> list[dict]:
    """The same fixed eval batches every time: the first rows in order (cycled if the eval set is small)."""
    src = _Rows(rows, shard)
    n = len(src)
    ds = grain.MapDataset.source(src).repeat()
    if span_fn is not None:
        ds = ds.random_map(span_fn, seed=12345)
    ds = ds.batch(batch_size, drop_remainder=True)
    return [ds[i] for i in range(max(1, min(cfg.train.eval_batches, math.ceil(n / batch_size))))]


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the token frequencies (padding excluded): the loss of the best context-free model."""
    t = np.asarray(tokens).reshape(-1)
    counts = np.bincount(t[t != PAD])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass
class Data:
    tokenizer: Tokenizer
    train_rows: dict
    eval_rows: dict
    span_fn: object  # None unless the objective is span corruption
    unigram_entropy: float
    eval_texts: list  # the held-out documents as text (sample prompts)


def prepare(cfg: RunConfig, model_cfg: ModelConfig, run_dir: Path | None) -> Data:
    """Everything host-side, with every data error raised before the model is built or compiled."""
    docs = read_documents(cfg)
    tr, ev = split(docs, cfg.data.eval_fraction)
    tok = get_tokenizer(cfg, model_cfg, tr, run_dir)
    train_rows, eval_rows = build_rows(tr, tok, cfg), build_rows(ev, tok, cfg)
    n = len(next(iter(train_rows.values())))
    if n < cfg.train.batch_size:
        raise ConfigError(f"data: {n} training rows of train.seq_len={cfg.train.seq_len} tokens is fewer than "
                          f"train.batch_size={cfg.train.batch_size}")
    span_fn = make_span_fn(cfg, tok) if cfg.train.objective == "span" else None
    return Data(tok, train_rows, eval_rows, span_fn, unigram_entropy(train_rows["tokens"]),
                [_text_of(x) for x in ev[:50]])
