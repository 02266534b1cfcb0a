"""A local Hugging Face tokenizer directory (or its `tokenizer.json`) as a memstack tokenizer.

`tokenizer: /path/to/dir` in a task config loads `<dir>/tokenizer.json` with the `tokenizers`
package (the `hf` extra); nothing is downloaded. The end-of-text id (documents are separated by
it) is the `eos_token` of `tokenizer_config.json` when the directory has one, else the first of
<|endoftext|>, </s>, <eos>, <|end_of_text|>, <|im_end|> that the vocabulary holds; a tokenizer
with none of them is refused with that list.

Bytes per id (for bits per byte): byte-level BPE symbols map 1:1 to bytes (GPT-2's table);
SentencePiece pieces count the UTF-8 bytes of the piece with its "▁" as a space, and byte-
fallback pieces <0xNN> one byte; special tokens 0.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from memstack.errors import ConfigError

EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


def tokenizer_file(name: str) -> Path | None:
    """`<name>/tokenizer.json` or `name` itself if it is such a file; None when `name` is no path."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p / "tokenizer.json"
    if p.suffix == ".json" or "/" in name:
        return p
    return None


def hf_tokenizer_reasons(name: str) -> list[str]:
    f = tokenizer_file(name)
    if f is None:
        return [f"tokenizer {name!r} is not a path"]
    if not f.is_file():
        return [f"tokenizer {name!r}: no {f.name} at {f} (a local Hugging Face tokenizer directory holds tokenizer.json)"]
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"tokenizer {name!r}: {f} is not readable JSON ({e})"]
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        return [f"tokenizer {name!r}: {f} is not a Hugging Face tokenizer.json (no 'model' section)"]
    return []


def hf_tokenizer_vocab(name: str) -> int:
    """Vocabulary size (ids 0..max id) read from tokenizer.json without building the tokenizer."""
    reasons = hf_tokenizer_reasons(name)
    if reasons:
        raise ConfigError(reasons, what="tokenizer")
    doc = json.loads(tokenizer_file(name).read_text(encoding="utf-8"))
    vocab = doc["model"].get("vocab", {})
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))   # Unigram: a list
    ids += [t["id"] for t in doc.get("added_tokens", [])]
    return max(ids) + 1 if ids else 0


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class HFTokenizer:
    """memstack's Tokenizer interface over a `tokenizers.Tokenizer` (`self._tok`): subclasses load it
    and set `name`, `vocab_size`, `eot_id` and `_fp`, and say how many bytes a piece stands for."""

    name: str
    vocab_size: int
    eot_id: int
    _fp: str

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"{self.name}: token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        return self._token_bytes.copy()

    def fingerprint(self) -> str:
        return self._fp

    @functools.cached_property
    def _token_bytes(self) -> np.ndarray:
        """Bytes each id stands for (0 for special tokens)."""
        inv = {c: b for b, c in bytes_to_unicode().items()}
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, i in self._tok.get_vocab(with_added_tokens=True).items():
            if tok not in specials:
                out[i] = self._piece_bytes(i, tok, inv)
        return out

    def _piece_bytes(self, i: int, tok: str, inv: dict[str, int]) -> int:
        raise NotImplementedError


class HFTokenizerDir(HFTokenizer):
    """memstack's Tokenizer interface over a local tokenizer.json."""

    def __init__(self, name: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("a Hugging Face tokenizer directory needs the `tokenizers` package; "
                              "pip install 'memstack[hf]'") from e
        reasons = hf_tokenizer_reasons(name)
        if reasons:
            raise ConfigError(reasons, what="tokenizer")
        path = tokenizer_file(name)
        self.name = str(Path(name).expanduser())
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = hf_tokenizer_vocab(name)
        eot = _eos_from_config(path.parent) or next((t for t in EOT_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        if eot is None or self._tok.token_to_id(eot) is None:
            raise ConfigError([f"tokenizer {name!r} has no end-of-text token: set eos_token in tokenizer_config.json or "
                               f"add one of {', '.join(EOT_CANDIDATES)}"], what="tokenizer")
        self.eot_id = self._tok.token_to_id(eot)
        self._fp = hashlib.sha256(b"memstack-hf-tokenizer-v1\n" + path.read_bytes()).hexdigest()[:16]
        doc = json.loads(path.read_text(encoding="utf-8"))
        self._byte_level = "ByteLevel" in json.dumps([doc.get("pre_tokenizer"), doc.get("decoder")])

    def __repr__(self) -> str:
        return f"HFTokenizerDir({self.name!r}, vocab_size={self.vocab_size})"

    def _piece_bytes(self, i: int, tok: str, inv: dict[str, int]) -> int:
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            return 1                                           # SentencePiece byte fallback
        if self._byte_level and all(ch in inv for ch in tok):
            return len(tok)                                    # byte-level BPE: one symbol per byte
        return len(tok.replace("▁", " ").encode("utf-8"))


def _eos_from_config(folder: Path) -> str | None:
    f = folder / "tokenizer_config.json"
    try:
        eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
