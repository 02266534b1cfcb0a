"""Record extraction: a segment lists the values of F fields in random order among noise; the
task is to output the value of every field -- a structured output of F positions at once.

Layout of one example (ids):
    0 = pad, 1 = separator, fields 2 .. 2+F-1, values 2+F .. 2+F+V-1, noise after them.
    record: the F pairs "field value" in a random order, with `n_noise` noise tokens inserted at
    random places between pairs, then padding to `length`.
    targets: (F,) the value id of field 0, 1, ..., F-1 (each drawn uniformly from V values).
    queries: (F,) the field ids 2 .. 2+F-1, for decoders that ask field by field.
Chance per field is 1/V. Same arguments and seed give identical arrays in any process.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import make_rng

PAD, SEP = 0, 1


@dataclass(frozen=True)
class RecordBatch:
    inputs: np.ndarray    # (N, length) int64 record tokens
    targets: np.ndarray   # (N, F) int64 value id per field
    queries: np.ndarray   # (N, F) int64 field ids (the same for every row)


def records_vocab(n_fields: int, n_values: int, n_noise_ids: int) -> int:
    return 2 + n_fields + n_values + n_noise_ids


def records(n: int, *, n_fields: int = 8, n_values: int = 16, n_noise: int = 8, n_noise_ids: int = 16,
            length: int | None = None, seed: int | tuple = 0) -> RecordBatch:
    """n record-extraction examples (see the module docstring)."""
    length = length or 2 * n_fields + n_noise
    if min(n_fields, n_values, n_noise_ids) < 1 or n_noise < 0 or length < 2 * n_fields + n_noise:
        raise ValueError(f"need n_fields, n_values, n_noise_ids >= 1, n_noise >= 0 and length >= 2 * n_fields + "
                         f"n_noise; got {n_fields}, {n_values}, {n_noise_ids}, {n_noise}, length {length}")
    rng = make_rng(seed)
    F, V = n_fields, n_values
    values = rng.integers(0, V, size=(n, F))                              # (n, F)
    inputs = np.full((n, length), PAD, dtype=np.int64)
    for i in range(n):
        order = rng.permutation(F)
        # where the noise goes: before pair 0 .. after pair F-1 (F+1 gaps)
        gaps = np.bincount(rng.integers(0, F + 1, size=n_noise), minlength=F + 1)
        seq: list[int] = []
        for j, f in enumerate(order):
            seq += list(2 + F + V + rng.integers(0, n_noise_ids, size=gaps[j]))
            seq += [2 + f, 2 + F + values[i, f]]
        seq += list(2 + F + V + rng.integers(0, n_noise_ids, size=gaps[F]))
        inputs[i, : len(seq)] = seq
    targets = (2 + F + values).astype(np.int64)
    queries = np.broadcast_to(np.arange(2, 2 + F, dtype=np.int64), (n, F)).copy()
    return RecordBatch(inputs, targets, queries)
