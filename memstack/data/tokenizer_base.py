"""The tokenizer interface every memstack tokenizer implements, and the byte tokenizer.

A tokenizer maps text to ids and back, and knows how many UTF-8 bytes each id stands for, so
that bits-per-byte is computed the same way for every vocabulary.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    name: str            # e.g. "gpt2", "bpe512", "byte"
    vocab_size: int      # ids are in [0, vocab_size)
    eot_id: int          # <|endoftext|>: document separator, also used as BOS

    def encode(self, text: str) -> list[int]: ...          # ordinary text, no special tokens
    def decode(self, ids: list[int]) -> str: ...
    def token_bytes(self) -> np.ndarray: ...               # (vocab_size,) int64 UTF-8 bytes per id; 0 for specials
    def fingerprint(self) -> str: ...                      # stable hex digest of the vocabulary


@dataclass(frozen=True)
class ByteTokenizer:
    """Raw UTF-8 bytes (ids 0..255) plus <|endoftext|> = 256. Needs no data; used by tests."""

    name: str = "byte"
    vocab_size: int = 257
    eot_id: int = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[self.eot_id] = 0
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(b"memstack-byte-tokenizer-v1").hexdigest()[:16]
