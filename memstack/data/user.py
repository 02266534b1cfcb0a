"""The user's own text as a corpus: a local text file, a folder of text files, JSONL, Parquet, or
a Hugging Face `datasets` dataset saved to disk (`Dataset.save_to_disk`).

`read_corpus(path, text_field)` returns the documents (id, text) and the splits the source
defines, if any. Every problem is collected before anything is returned and raised at once as a
`ConfigError` listing each one (a missing path, an unreadable or non-UTF-8 file, a JSONL line
that is not an object, a record whose text field is missing or not a string, an empty corpus,
a missing optional package), so a run fails before any training starts, never halfway.

Formats, by what the path is:
- a directory holding `dataset_info.json` or `dataset_dict.json` (+ `state.json`): a saved
  Hugging Face dataset (needs `datasets`); a DatasetDict's `train` / `validation` (or `val`) /
  `test` splits are kept as the corpus's splits;
- any other directory: every `*.txt`, `*.md`, `*.rst` file under it (recursively, sorted),
  one document per file; if it has `train/`, `val/` (or `validation/`) and `test/`
  subdirectories, those are the splits;
- `*.jsonl` / `*.ndjson`: one JSON object per line, the document in `text_field`;
- `*.parquet`: one row per document, the document in column `text_field` (needs `pyarrow`);
- any other file: UTF-8 text, one document.

Without splits from the source, documents are split deterministically: with at least 20
documents by a hash of each document's id (stable when documents are added: 90 % train, 5 % val,
5 % test); with fewer, every document is cut by position, 90 / 5 / 5 (as the novels are).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from memstack.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
HASH_SPLIT_MIN_DOCS = 20
MAX_REASONS = 20          # problems listed per corpus; the rest are counted


@dataclass(frozen=True)
class UserCorpus:
    path: str
    format: str                               # "text", "folder", "jsonl", "parquet", "hf_dataset"
    docs: tuple[tuple[str, str], ...]         # (id, text)
    splits: dict[str, tuple[int, ...]] | None  # split -> document indices, when the source defines them

    def split(self, split: str) -> list[str]:
        """Texts of "train", "val" or "test" (or "all")."""
        if split == "all":
            return [t for _, t in self.docs]
        if self.splits is not None:
            return [self.docs[i][1] for i in self.splits.get(split, ())]
        if len(self.docs) >= HASH_SPLIT_MIN_DOCS:
            return [t for i, t in self.docs if hash_split(i) == split]
        lo, hi = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}[split]
        return [t[int(lo * len(t)):int(hi * len(t))] for _, t in self.docs]

    def sha256(self) -> str:
        h = hashlib.sha256(b"memstack-user-corpus-v1\n")
        for i, t in self.docs:
            h.update(f"{len(i)}:{i}:{len(t.encode())}:".encode())
            h.update(t.encode())
        return h.hexdigest()


def hash_split(doc_id: str) -> str:
    b = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 20
    return "val" if b == 18 else "test" if b == 19 else "train"


BUILTIN_CORPORA = ("sotu", "austen", "moby_dick")


def is_path_corpus(name: str) -> bool:
    """A corpus name that is a path rather than a built-in corpus (sotu, austen, moby_dick)."""
    return name not in BUILTIN_CORPORA


def path_reasons(name: str, text_field: str = "text") -> list[str]:
    """Cheap checks of a corpus path (for config validation): it exists and is readable."""
    p = Path(name).expanduser()
    if not p.exists():
        return [f"corpus {name!r}: no such file or directory (built-in corpora: sotu, austen, moby_dick)"]
    if p.is_file():
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            return [f"corpus {name!r}: cannot be read ({e.strerror or e})"]
    if not text_field:
        return ["text_field must be a non-empty column / key name"]
    return []


def read_corpus(name: str, text_field: str = "text") -> UserCorpus:
    """Read and check a user corpus (formats in the module docstring); raises ConfigError with
    every problem found."""
    p = Path(name).expanduser()
    reasons = path_reasons(name, text_field)
    if reasons:
        raise ConfigError(reasons, what="corpus")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            fmt, docs, splits, reasons = "hf_dataset", *_read_hf(p, text_field)
        else:
            fmt, docs, splits, reasons = "folder", *_read_folder(p)
    elif p.suffix.lower() in (".jsonl", ".ndjson"):
        fmt, docs, splits, reasons = "jsonl", *_read_jsonl(p, text_field)
    elif p.suffix.lower() == ".parquet":
        fmt, docs, splits, reasons = "parquet", *_read_parquet(p, text_field)
    else:
        fmt, (docs, splits, reasons) = "text", _read_text_file(p)
    if not reasons:
        if not docs:
            reasons.append(f"corpus {name!r} holds no documents")
        elif not any(t.strip() for _, t in docs):
            reasons.append(f"corpus {name!r}: every document is empty")
        elif splits is not None:
            reasons += [f"corpus {name!r}: its {s!r} split is empty" for s in ("train",) if not splits.get(s)]
    if reasons:
        extra = len(reasons) - MAX_REASONS
        reasons = reasons[:MAX_REASONS] + ([f"... and {extra} more problem(s)"] if extra > 0 else [])
        raise ConfigError(reasons, what=f"corpus {name}")
    return UserCorpus(str(p), fmt, tuple(docs), splits)


def _decode(raw: bytes, where: str, reasons: list[str]) -> str | None:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        reasons.append(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                       "convert it to UTF-8 or point the corpus at text files only")
        return None


def _read_text_file(p: Path):
    reasons: list[str] = []
    try:
        raw = p.read_bytes()
    except OSError as e:
        return [], None, [f"{p}: cannot be read ({e.strerror or e})"]
    if b"\x00" in raw[:8192]:
        reasons.append(f"{p}: looks binary (NUL bytes), not a text file; supported: text, a folder of *.txt/*.md/*.rst, "
                       "*.jsonl, *.parquet, a saved Hugging Face dataset")
        return [], None, reasons
    text = _decode(raw, str(p), reasons)
    return ([(p.name, text)] if text is not None else []), None, reasons


def _read_folder(p: Path):
    reasons: list[str] = []
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        others = sorted(f.name for f in p.rglob("*") if f.is_file())[:5]
        return [], None, [f"{p}: no {', '.join('*' + s for s in TEXT_SUFFIXES)} files in this folder"
                          + (f" (found e.g. {', '.join(others)})" if others else " (it is empty)")]
    docs = []
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as e:
            reasons.append(f"{f}: cannot be read ({e.strerror or e})")
            continue
        text = _decode(raw, str(f), reasons)
        if text is not None:
            docs.append((str(f.relative_to(p)), text))
    names = {d.name for d in p.iterdir() if d.is_dir()}
    split_dirs = {"train": "train", "val": "val" if "val" in names else "validation", "test": "test"}
    splits = None
    if {"train", "test"} <= names and ("val" in names or "validation" in names):
        splits = {s: tuple(i for i, (doc_id, _) in enumerate(docs) if Path(doc_id).parts[0] == d)
                  for s, d in split_dirs.items()}
    return docs, splits, reasons


def _read_jsonl(p: Path, field: str):
    reasons: list[str] = []
    docs = []
    try:
        raw = p.read_bytes()
    except OSError as e:
        return [], None, [f"{p}: cannot be read ({e.strerror or e})"]
    text = _decode(raw, str(p), reasons)
    if text is None:
        return [], None, reasons
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            reasons.append(f"{p}:{n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            reasons.append(f"{p}:{n}: a JSON {type(obj).__name__}, expected an object with a {field!r} field")
        elif field not in obj:
            reasons.append(f"{p}:{n}: no {field!r} field (fields: {', '.join(sorted(obj)[:8])}); set task.text_field")
        elif not isinstance(obj[field], str):
            reasons.append(f"{p}:{n}: field {field!r} is a {type(obj[field]).__name__}, expected a string")
        else:
            docs.append((f"{p.name}:{n}", obj[field]))
    return docs, None, reasons


def _read_parquet(p: Path, field: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return [], None, [f"{p}: reading Parquet needs pyarrow; pip install 'memstack[data]'"]
    try:
        table = pq.read_table(p)
    except Exception as e:   # pyarrow raises its own error types for a corrupt file
        return [], None, [f"{p}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})"]
    return _column_docs(table, field, str(p), p.name)


def _column_docs(table, field: str, where: str, prefix: str):
    import pyarrow as pa

    if field not in table.column_names:
        return [], None, [f"{where}: no column {field!r} (columns: {', '.join(table.column_names[:8])}); set task.text_field"]
    col = table.column(field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return [], None, [f"{where}: column {field!r} has type {col.type}, expected strings"]
    reasons = [f"{where}: row {i}: {field!r} is null" for i, v in enumerate(col.to_pylist()) if v is None]
    docs = [(f"{prefix}:{i}", v) for i, v in enumerate(col.to_pylist()) if v is not None]
    return docs, None, reasons


def _read_hf(p: Path, field: str):
    try:
        import datasets
    except ImportError:
        return [], None, [f"{p}: a saved Hugging Face dataset needs the `datasets` package; pip install 'memstack[data]'"]
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:   # datasets raises FileNotFoundError / its own errors for a damaged folder
        return [], None, [f"{p}: not a loadable saved dataset ({type(e).__name__}: {str(e).splitlines()[0]})"]
    if isinstance(ds, datasets.DatasetDict):
        names = {"train": "train", "val": "validation" if "validation" in ds else "val", "test": "test"}
        missing = [n for n in names.values() if n not in ds]
        docs, reasons, splits = [], [], {}
        for s, n in names.items():
            if n not in ds:
                continue
            d, _, r = _column_docs(ds[n].data.table, field, f"{p} [{n}]", n)
            splits[s] = tuple(range(len(docs), len(docs) + len(d)))
            docs += d
            reasons += r
        if missing and len(missing) < 3:
            reasons.append(f"{p}: a DatasetDict needs train, validation (or val) and test splits; missing "
                           f"{', '.join(missing)} (has {', '.join(ds)})")
        elif missing:   # none of the usual names: every split's rows as one corpus, split by hash
            docs, reasons = [], []
            for n in ds:
                d, _, r = _column_docs(ds[n].data.table, field, f"{p} [{n}]", n)
                docs += d
                reasons += r
            splits = None
        return docs, splits, reasons
    return _column_docs(ds.data.table, field, str(p), p.name)
