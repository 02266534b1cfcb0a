"""Hashed-content addressing for Engram: tokenizer compression, suffix N-grams, multi-head
multiplicative-XOR hashing into prime-sized tables, and the versioned hash layout.

Tokenizer compression (Engram §2.2; DeepSeek's demo `CompressedTokenizer`): every token's text
is normalised -- NFKC, NFD, strip accents (combining marks), lowercase, collapse runs of
[ \\t\\r\\n] to one space, keep a lone space as it is, strip -- and token ids with the same
normalised text share one compressed id (a surjective map V -> V'), assigned first-seen in id
order. A token that is not valid UTF-8 on its own (a partial multi-byte character) keeps its
raw bytes as key; special tokens (<|endoftext|>) keep their own id. Compressed id V' is the pad
that fills N-gram positions before a document starts.

Hashing (Engram Eq. 1 as in the demo `NgramHashMapping`): per Engram layer, `max_order` odd
int64 multipliers m_j drawn from PCG64(seed + 10007 * layer); for order n,
    mix_n(t) = x'_t * m_0  XOR  x'_{t-1} * m_1  XOR ... XOR  x'_{t-n+1} * m_{n-1}   (int64, wrapping)
and head k of order n reads row  mix_n(t) mod p_{n,k}  of its own table, where the p are
distinct primes (across all layers, orders and heads), searched upward from `rows_per_head`.
All heads of all layers live in one table with per-head row offsets.

The layout -- token map, multipliers, primes, offsets, compressed vocabulary, tokenizer
fingerprint, format version -- is derived from the config and the tokenizer, stored with the
model's weights, and compared when a checkpoint is loaded: a different tokenizer or a different
derivation is refused instead of silently reading the wrong rows (DeepSeek's runtimes re-derive
it and only notice a mismatch through bad outputs).

Deviation: `rows_per_head = 1` gives every head a single row (not the prime 2): the capacity-1
control that tests whether gains come from table capacity (Engram issue #24).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

LAYOUT_VERSION = 1
_WS = re.compile(r"[ \t\r\n]+")


def normalize_token_text(text: str) -> str:
    """The compression key of a token's text (see the module docstring)."""
    s = unicodedata.normalize("NFKC", text)
    s = unicodedata.normalize("NFD", s)
    s = "".join(c for c in s if unicodedata.category(c) != "Mn")   # strip accents
    s = _WS.sub(" ", s.lower())
    return s if s == " " else s.strip()


def token_byte_strings(tokenizer) -> list[bytes | None]:
    """The bytes of every token id (None for special tokens)."""
    V = tokenizer.vocab_size
    enc = getattr(tokenizer, "_enc", None)
    out: list[bytes | None] = []
    for i in range(V):
        if i == getattr(tokenizer, "eot_id", -1):
            out.append(None)
        elif enc is not None:
            out.append(enc.decode_single_token_bytes(i))
        elif getattr(tokenizer, "name", "") == "byte":
            out.append(bytes([i]))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def compression_map(token_bytes: list[bytes | None]) -> tuple[np.ndarray, int]:
    """(token_map (V,) int64, compressed vocabulary size V')."""
    ids: dict[object, int] = {}
    out = np.empty(len(token_bytes), dtype=np.int64)
    for i, b in enumerate(token_bytes):
        if b is None:
            key: object = ("special", i)
        else:
            try:
                key = normalize_token_text(b.decode("utf-8"))
            except UnicodeDecodeError:
                key = ("raw", b)
        out[i] = ids.setdefault(key, len(ids))
    return out, len(ids)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def distinct_primes(start: int, count: int) -> list[int]:
    """`count` consecutive primes >= start."""
    out, n = [], max(2, start)
    while len(out) < count:
        if _is_prime(n):
            out.append(n)
        n += 1
    return out


@dataclass(frozen=True)
class HashLayout:
    """Everything that decides which row a token N-gram reads. Tensors are int64 on CPU."""

    token_map: Tensor        # (V,) original id -> compressed id
    compressed_vocab: int    # V'; the pad id is V'
    orders: tuple[int, ...]
    heads: int
    multipliers: Tensor      # (L, max_order) odd int64, one row per Engram layer
    sizes: Tensor            # (L, n_orders, heads) rows of each head's table
    offsets: Tensor          # (L, n_orders, heads) first row of each head's table
    tokenizer_fingerprint: str = ""
    version: int = LAYOUT_VERSION

    @property
    def pad_id(self) -> int:
        return self.compressed_vocab

    @property
    def max_order(self) -> int:
        return max(self.orders)

    @property
    def total_rows(self) -> int:
        return int(self.sizes.sum())

    @property
    def heads_per_layer(self) -> int:
        return len(self.orders) * self.heads

    def tensors(self) -> dict[str, Tensor]:
        """What is stored with the weights (buffers named layout_*)."""
        meta = f"v{self.version}|{self.compressed_vocab}|{','.join(map(str, self.orders))}|{self.heads}|{self.tokenizer_fingerprint}"
        return {"token_map": self.token_map, "multipliers": self.multipliers, "sizes": self.sizes,
                "offsets": self.offsets, "meta": torch.tensor(list(meta.encode()), dtype=torch.uint8)}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, t in sorted(self.tensors().items()):
            h.update(k.encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def compress(self, tokens: Tensor) -> Tensor:
        """Original ids (any shape) -> compressed ids."""
        return self.token_map.to(tokens.device)[tokens]


def build_layout(vocab_size: int, n_layers: int, orders: tuple[int, ...], heads: int, rows_per_head: int, seed: int,
                 tokenizer=None, compress: bool = True) -> HashLayout:
    """Derive the layout from the config (and the tokenizer, when compressing by it)."""
    if tokenizer is not None and compress:
        token_map, vp = compression_map(token_byte_strings(tokenizer))
        fp = tokenizer.fingerprint()
    else:
        token_map, vp = np.arange(vocab_size, dtype=np.int64), vocab_size
        fp = tokenizer.fingerprint() if tokenizer is not None else ""
    max_order = max(orders)
    bound = np.iinfo(np.int64).max // max(vp + 1, 1) // 2
    mult = np.stack([np.random.default_rng(seed + 10007 * layer).integers(0, bound, size=max_order, dtype=np.int64) * 2 + 1
                     for layer in range(n_layers)])                 # (L, max_order)
    n = n_layers * len(orders) * heads
    sizes = [1] * n if rows_per_head == 1 else distinct_primes(rows_per_head, n)
    sizes_t = torch.tensor(sizes, dtype=torch.int64).view(n_layers, len(orders), heads)
    offsets = torch.cumsum(torch.tensor([0] + sizes[:-1], dtype=torch.int64), 0).view_as(sizes_t)
    return HashLayout(torch.from_numpy(token_map), vp, tuple(orders), heads, torch.from_numpy(mult), sizes_t, offsets, fp)


def ngram_rows(layout: HashLayout, layer: int, comp: Tensor) -> Tensor:
    """Rows read for each token of a chunk.

    comp: (B, H + T) compressed ids: the H = max_order - 1 ids before the chunk (pad before the
    document starts), then the chunk's T ids. Returns (B, T, n_orders * heads) int64 rows of the
    table, ordered order-major (order orders[0]: heads 0..K-1, then orders[1], ...)."""
    Hm = layout.max_order - 1
    T = comp.shape[1] - Hm
    mult = layout.multipliers[layer].to(comp.device)                  # (max_order,)
    mix = torch.zeros(comp.shape[0], T, dtype=torch.int64, device=comp.device)
    out = []
    sizes = layout.sizes[layer].to(comp.device)                       # (n_orders, heads)
    offs = layout.offsets[layer].to(comp.device)
    by_order = {}
    for j in range(layout.max_order):
        x = comp[:, Hm - j: Hm - j + T]                               # (B, T) token t - j
        mix = mix ^ (x * mult[j])                                     # int64 multiply wraps
        by_order[j + 1] = mix
    for oi, n in enumerate(layout.orders):
        r = torch.remainder(by_order[n][..., None], sizes[oi])        # (B, T, heads) in [0, p)
        out.append(r + offs[oi])
    return torch.cat(out, dim=-1)                                     # (B, T, n_orders * heads)
