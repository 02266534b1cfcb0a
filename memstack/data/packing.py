"""Batches of segments, with document boundaries kept.

Every training and evaluation batch has the same layout:

    Batch.tokens  (B, N, S)  input ids: B rows, N consecutive segments of S tokens each
    Batch.targets (B, N, S)  next-token targets; -100 where there is nothing to predict
    Batch.reset   (B, N)     True where a row starts a new document at that segment

`DocumentStream` packs a corpus into B parallel rows. Each row reads whole documents one after
another, and every document starts on a segment boundary: a document is `[<eot>] + tokens`,
cut into segments of S inputs (targets shifted by one), its last segment padded with
`targets = -100`. So a memory never carries state across documents (the row is reset at each
document's first segment) and every token of the corpus is predicted exactly once, with a
context that is exactly "the document so far". Padding costs < S tokens per document.

`ExampleSource` serves fixed-length examples (MQAR, passkey, ...): each example is one row of
ceil(L / S) segments, reset at its first segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

IGNORE = -100


@dataclass
class Batch:
    tokens: Tensor    # (B, N, S) int64
    targets: Tensor   # (B, N, S) int64, -100 = no loss
    reset: Tensor     # (B, N) bool

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.reset.to(device))

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(self.tokens[start:stop], self.targets[start:stop], self.reset[start:stop])


class DocumentStream:
    """B rows reading documents segment by segment (see module docstring).

    docs: token arrays (without <eot>). With shuffle, documents are visited in a seeded random
    order, reshuffled each epoch; with loop=False the stream ends after one pass (rows with no
    document left yield padding segments, and `exhausted` turns True once all rows are idle).
    rank/world: this process's share of the rows under data parallelism; every process walks
    the same global stream, so the union of the ranks' rows is exactly the single-process batch.
    """

    def __init__(self, docs: Sequence[np.ndarray], rows: int, seg_len: int, eot_id: int, *, seed: int = 0,
                 shuffle: bool = True, loop: bool = True, rank: int = 0, world: int = 1):
        if rows % world:
            raise ValueError(f"rows ({rows}) must be divisible by the number of processes ({world})")
        docs = [d for d in docs if len(d)]
        if not docs:
            raise ValueError("DocumentStream needs at least one non-empty document")
        self.docs = [np.concatenate([[eot_id], np.asarray(d, dtype=np.int64)]) for d in docs]
        self.rows, self.seg_len, self.eot_id = rows, seg_len, eot_id
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.lo, self.hi = rank * rows // world, (rank + 1) * rows // world
        self.epoch, self.next_doc = 0, 0
        self.order = self._order(0)
        self.cur = [-1] * rows          # document index per row (-1: needs one; -2: idle, stream ended)
        self.off = [0] * rows           # offset of the row's next segment inside its document

    def _order(self, epoch: int) -> list[int]:
        idx = np.arange(len(self.docs))
        if self.shuffle:
            np.random.Generator(np.random.PCG64([self.seed, epoch])).shuffle(idx)
        return idx.tolist()

    def _pull(self) -> int:
        if self.next_doc == len(self.order):
            if not self.loop:
                return -2
            self.epoch += 1
            self.order, self.next_doc = self._order(self.epoch), 0
        self.next_doc += 1
        return self.order[self.next_doc - 1]

    @property
    def exhausted(self) -> bool:
        return all(c == -2 for c in self.cur)

    def next(self, n_segments: int) -> Batch:
        B, S = self.rows, self.seg_len
        tokens = np.full((B, n_segments, S), self.eot_id, dtype=np.int64)
        targets = np.full((B, n_segments, S), IGNORE, dtype=np.int64)
        reset = np.zeros((B, n_segments), dtype=bool)
        for n in range(n_segments):
            for r in range(B):
                if self.cur[r] == -1 or (self.cur[r] >= 0 and self.off[r] >= len(self.docs[self.cur[r]]) - 1):
                    self.cur[r], self.off[r] = self._pull(), 0
                    reset[r, n] = True
                if self.cur[r] == -2:
                    reset[r, n] = True
                    continue
                d, o = self.docs[self.cur[r]], self.off[r]
                x = d[o:o + S]
                y = d[o + 1:o + S + 1]
                tokens[r, n, :len(x)] = x
                targets[r, n, :len(y)] = y
                self.off[r] = o + S
        sl = slice(self.lo, self.hi)
        return Batch(torch.from_numpy(tokens[sl]), torch.from_numpy(targets[sl]), torch.from_numpy(reset[sl]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_doc": self.next_doc, "cur": list(self.cur), "off": list(self.off)}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.next_doc = d["epoch"], d["next_doc"]
        self.order = self._order(self.epoch)
        self.cur, self.off = list(d["cur"]), list(d["off"])


class ExampleSource:
    """Fixed-length examples as rows of ceil(L/S) segments (reset at the first one).

    inputs/labels: (E, L) int64 with labels already shifted (-100 = no loss). Batches draw
    examples in a seeded order (reshuffled per epoch); with loop=False, one pass, the last batch
    possibly smaller.
    """

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, rows: int, seg_len: int, *, pad_id: int = 0,
                 seed: int = 0, shuffle: bool = True, loop: bool = True, rank: int = 0, world: int = 1):
        if rows % world:
            raise ValueError(f"rows ({rows}) must be divisible by the number of processes ({world})")
        E, L = inputs.shape
        self.n_segments = -(-L // seg_len)
        pad = self.n_segments * seg_len - L
        self.inputs = np.pad(inputs, ((0, 0), (0, pad)), constant_values=pad_id).reshape(E, self.n_segments, seg_len)
        self.labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(E, self.n_segments, seg_len)
        self.rows, self.seed, self.shuffle, self.loop = rows, seed, shuffle, loop
        self.lo, self.hi = rank * rows // world, (rank + 1) * rows // world
        self.epoch, self.cursor = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        idx = np.arange(len(self.inputs))
        if self.shuffle:
            np.random.Generator(np.random.PCG64([self.seed, epoch])).shuffle(idx)
        return idx

    @property
    def exhausted(self) -> bool:
        return not self.loop and self.cursor >= len(self.order)

    def next(self, n_segments: int | None = None) -> Batch:
        """A batch of `rows` examples (n_segments is fixed by the example length and ignored)."""
        take = []
        while len(take) < self.rows:
            if self.cursor == len(self.order):
                if not self.loop:
                    break
                self.epoch += 1
                self.order, self.cursor = self._order(self.epoch), 0
            n = min(self.rows - len(take), len(self.order) - self.cursor)
            take.extend(self.order[self.cursor:self.cursor + n].tolist())
            self.cursor += n
        if not take:
            raise StopIteration("ExampleSource exhausted")
        idx = np.asarray(take)
        reset = np.zeros((len(idx), self.n_segments), dtype=bool)
        reset[:, 0] = True
        sl = slice(self.lo * len(idx) // self.rows, self.hi * len(idx) // self.rows)
        return Batch(torch.from_numpy(self.inputs[idx][sl]), torch.from_numpy(self.labels[idx][sl]), torch.from_numpy(reset[sl]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.cursor = d["epoch"], d["cursor"]
        self.order = self._order(self.epoch)
