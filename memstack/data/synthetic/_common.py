"""Shared pieces of the synthetic generators: the batch type, seeding and exact samplers.

Every generator draws from its own ``numpy.random.Generator(PCG64(seed))``; nothing touches the
global NumPy or torch RNG state, so the same arguments and seed give identical arrays in any
process (for a given NumPy version).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # label value that carries no loss (torch's cross_entropy default)

Seed = int | Sequence[int]


@dataclass(frozen=True, eq=False)
class SyntheticBatch:
    """``inputs`` and ``labels`` are int64 arrays of shape (N, L).

    ``labels[i, t]`` is the token the model must predict after reading ``inputs[i, :t+1]``
    (already shifted), or ``IGNORE_INDEX`` where there is no loss. ``meta`` holds per-task
    details (per-example arrays have N as their first dimension).
    """

    inputs: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("inputs", "labels"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 2:
                raise TypeError(f"SyntheticBatch.{name} must be a 2-D int64 numpy array")
        if self.inputs.shape != self.labels.shape:
            raise ValueError(f"inputs {self.inputs.shape} and labels {self.labels.shape} differ in shape")

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.inputs.shape[1])

    def __len__(self) -> int:
        return self.num_examples


def make_rng(seed: Seed) -> np.random.Generator:
    """A PCG64 generator from a non-negative int or a sequence of non-negative ints."""
    parts = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    if not parts or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0 for p in parts):
        raise ValueError(f"seed must be a non-negative int or a non-empty sequence of them, got {seed!r}")
    return np.random.Generator(np.random.PCG64([int(p) for p in parts] if len(parts) > 1 else int(parts[0])))


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


_CHUNK_ELEMS = 1 << 22  # bound on the (rows, n) score matrix materialised at once


def sample_without_replacement(
    rng: np.random.Generator, rows: int, k: int, n: int, p: np.ndarray | None = None
) -> np.ndarray:
    """(rows, k) int64: per row, k distinct indices from range(n), in draw order.

    With ``p=None`` each row is a uniformly random ordered k-subset. With weights ``p`` (length
    n, positive) each row has the law of k successive draws without replacement, each draw
    proportional to ``p`` over the indices not yet drawn (what ``numpy.random.choice(n, k,
    replace=False, p=p)`` samples). Both are exact; rows are independent.
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct items from {n}")
    if p is None and k * (k + 1) // 2 < n:
        return _floyd(rng, rows, k, n)
    # Exponential race: item i finishes at E_i / p_i; the first k finishers, in finishing order,
    # are k successive draws without replacement with probabilities proportional to p.
    out = np.empty((rows, k), dtype=np.int64)
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        t = rng.standard_exponential((hi - lo, n))
        if p is not None:
            t /= p
        idx = np.argpartition(t, k - 1, axis=1)[:, :k] if 0 < k < n else np.tile(np.arange(n), (hi - lo, 1))
        order = np.argsort(np.take_along_axis(t, idx, axis=1), axis=1, kind="stable")
        out[lo:hi] = np.take_along_axis(idx, order, axis=1)[:, :k]
    return out


def _floyd(rng: np.random.Generator, rows: int, k: int, n: int) -> np.ndarray:
    """Floyd's algorithm, vectorised over rows (O(rows * k^2)), then a uniform shuffle."""
    sel = np.empty((rows, k), dtype=np.int64)
    for i in range(k):
        j = n - k + i
        t = rng.integers(0, j + 1, size=rows, dtype=np.int64)
        dup = (sel[:, :i] == t[:, None]).any(axis=1)
        sel[:, i] = np.where(dup, j, t)
    perm = np.argsort(rng.random((rows, k)), axis=1, kind="stable")
    return np.take_along_axis(sel, perm, axis=1)
