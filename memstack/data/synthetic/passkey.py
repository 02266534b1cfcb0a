"""Passkey retrieval (Mohtashami & Jaggi, arXiv 2305.16300) with real-text filler.

One example is exactly ``length`` tokens::

    PREFIX | filler[:ins] | NEEDLE(key) | filler[ins:] | QUESTION | ANSWER(key)

Each piece is tokenized on its own and the ids are concatenated, so piece boundaries are exact.
The filler is a contiguous run of the caller's token array (e.g. a tokenized novel), cut from a
random offset to make the total exactly ``length``; if the array is shorter than the run it is
read cyclically. The needle goes after ``ins = round(depth * F)`` filler tokens, F being the
filler run's length (depth 0: right after the prefix; depth 1: right before the question).
Labels are -100 except at the position *before* each answer token, which holds that token.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from memstack.data.tokenizer_base import Tokenizer
from memstack.errors import ConfigError

from ._common import IGNORE_INDEX, Seed, SyntheticBatch, is_int, make_rng

PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = " What is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"


class PasskeyCell(NamedTuple):
    length: int
    depth: float | None
    batch: SyntheticBatch


def _check_args(tokenizer: Tokenizer, filler: np.ndarray, num_examples: int, length: int,
                depth: float | None, n_digits: int) -> list[str]:
    errs: list[str] = []
    for name, v in (("num_examples", num_examples), ("length", length)):
        if not is_int(v) or v < 1:
            errs.append(f"{name} must be a positive int (got {v!r})")
    if not is_int(n_digits) or not 1 <= n_digits <= 18:
        errs.append(f"n_digits must be an int in [1, 18] (got {n_digits!r})")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float))
                              or not 0.0 <= depth <= 1.0):
        errs.append(f"depth must be a float in [0, 1] or None (got {depth!r})")
    if filler.ndim != 1 or filler.size == 0:
        errs.append(f"filler_ids must be a non-empty 1-D token array (got shape {filler.shape})")
    elif not np.issubdtype(filler.dtype, np.integer):
        errs.append(f"filler_ids must hold integer token ids (got dtype {filler.dtype})")
    elif filler.min() < 0 or filler.max() >= tokenizer.vocab_size:
        errs.append(f"filler_ids must lie in [0, {tokenizer.vocab_size}) "
                    f"(got range [{filler.min()}, {filler.max()}])")
    return errs


def passkey(
    tokenizer: Tokenizer,
    filler_ids: Sequence[int] | np.ndarray,
    num_examples: int,
    length: int,
    depth: float | None,
    seed: Seed,
    n_digits: int = 5,
) -> SyntheticBatch:
    """``num_examples`` passkey examples of exactly ``length`` tokens.

    ``depth`` is the needle's position as a fraction of the filler run (0..1), or None for an
    independent uniform depth per example. The key is uniform over ``n_digits``-digit integers
    (no leading zero). The random draws (keys, filler offsets, then per-example depths) are made
    in a fixed order, so one seed gives the same keys and filler at every depth and length
    changes only where the needle sits.

    Raises ``ConfigError`` (a ``ValueError``) if ``length`` cannot hold prefix + needle + question
    + answer for some example (the message gives the minimum), or on bad arguments.

    ``meta`` per example ((N,) arrays): ``keys``, ``depth`` (the depth used), ``needle_offset``
    and ``needle_len`` (token span of the needle), ``answer_start``/``answer_len``,
    ``filler_offset`` (start in ``filler_ids``), ``filler_len`` (F); plus the scalar arguments.
    """
    filler = np.asarray(filler_ids)
    errs = _check_args(tokenizer, filler, num_examples, length, depth, n_digits)
    if errs:
        raise ConfigError(errs, "passkey configuration")
    filler = filler.astype(np.int64, copy=False)
    rng = make_rng(seed)
    n = num_examples
    keys = rng.integers(10 ** (n_digits - 1), 10 ** n_digits, size=n, dtype=np.int64)
    u_offset = rng.random(n)
    u_depth = rng.random(n)  # always drawn, so keys/offsets do not depend on `depth`
    depths = u_depth if depth is None else np.full(n, float(depth))

    prefix = np.asarray(tokenizer.encode(PASSKEY_PREFIX), dtype=np.int64)
    question = np.asarray(tokenizer.encode(PASSKEY_QUESTION), dtype=np.int64)
    needles = [np.asarray(tokenizer.encode(PASSKEY_NEEDLE.format(key=int(k))), dtype=np.int64) for k in keys]
    answers = [np.asarray(tokenizer.encode(PASSKEY_ANSWER.format(key=int(k))), dtype=np.int64) for k in keys]
    fixed = prefix.size + question.size
    need = max(fixed + nd.size + an.size for nd, an in zip(needles, answers))
    if need > length:
        raise ConfigError([f"length={length} is too small: prefix ({prefix.size}) + needle + question "
                           f"({question.size}) + answer need {need} tokens with this tokenizer"],
                          "passkey configuration")

    inputs = np.empty((n, length), dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    meta_cols = {c: np.empty(n, dtype=np.int64) for c in
                 ("needle_offset", "needle_len", "answer_start", "answer_len", "filler_offset", "filler_len")}
    total = filler.size
    for i in range(n):
        nd, an = needles[i], answers[i]
        f_len = length - fixed - nd.size - an.size
        span = total - f_len + 1 if total >= f_len else total  # offsets that avoid wrapping, if any
        off = min(int(u_offset[i] * span), span - 1)
        run = filler[(off + np.arange(f_len)) % total]
        ins = int(np.floor(depths[i] * f_len + 0.5))
        row = np.concatenate([prefix, run[:ins], nd, run[ins:], question, an])
        assert row.size == length
        inputs[i] = row
        a0 = length - an.size
        labels[i, a0 - 1:length - 1] = an
        for c, v in (("needle_offset", prefix.size + ins), ("needle_len", nd.size), ("answer_start", a0),
                     ("answer_len", an.size), ("filler_offset", off), ("filler_len", f_len)):
            meta_cols[c][i] = v

    meta = {"task": "passkey", "keys": keys, "depth": depths, **meta_cols, "length": length,
            "n_digits": n_digits, "tokenizer": tokenizer.name, "prefix_len": int(prefix.size),
            "question_len": int(question.size)}
    return SyntheticBatch(inputs, labels, meta)


def passkey_grid(
    tokenizer: Tokenizer,
    filler_ids: Sequence[int] | np.ndarray,
    lengths: Sequence[int],
    depths: Sequence[float | None],
    per_cell: int,
    seed: int,
    n_digits: int = 5,
) -> list[PasskeyCell]:
    """A length x depth grid: one ``PasskeyCell(length, depth, batch)`` per pair, lengths outer.

    Cell (L, d) is ``passkey(..., per_cell, L, d, seed=(seed, L), n_digits)``: it does not depend
    on which other cells are in the grid, and all depths at one length share keys and filler, so
    depth is the only thing that varies along a row.
    """
    if not is_int(seed) or seed < 0:
        raise ConfigError([f"seed must be a non-negative int (got {seed!r})"], "passkey grid")
    filler = np.asarray(filler_ids)
    return [PasskeyCell(L, d, passkey(tokenizer, filler, per_cell, L, d, (seed, L), n_digits))
            for L in lengths for d in depths]
