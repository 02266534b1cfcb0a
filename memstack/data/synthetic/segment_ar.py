"""Segment-level associative retrieval for recurrent memories (ARMT-style, arXiv 2407.04841).

An example is ``num_pairs + 1`` segments of ``segment_len`` tokens. Write segment j holds one
pair and padding; the final segment asks for one key::

    write j :  s_1 .. s_l  SEP  value  PAD ... PAD         (labels all -100)
    query   :  s_1 .. s_l  SEP  PAD ... PAD                (label at SEP = the answer value)

Token ids: ``PAD = 0``, ``SEP = 1``, key symbol c at ``2 + c`` (c < n_key_symbols), value v at
``2 + n_key_symbols + v`` (v < n_values); ids above that are unused. A key is a string of
``key_len[0]..key_len[1]`` symbols, uniform over all such strings.

* ``rewrite=False``: the num_pairs keys of an example are distinct; values are iid uniform.
* ``rewrite=True``: each example has a pool of ``key_pool_size`` (default ``num_pairs // 2``)
  distinct keys and every write segment draws its key uniformly from the pool, so (pigeonhole)
  at least one key is written twice. A re-write always changes the key's value. The answer is the
  value of the LATEST write of the queried key.

The queried key is the key of a uniformly chosen write segment, so it always appears in the
write segments (under rewrite, frequently written keys are queried more often). The query
segment does not contain the answer token; only the label at its SEP carries it.
"""
from __future__ import annotations

import numpy as np

from memstack.errors import ConfigError

from ._common import IGNORE_INDEX, Seed, SyntheticBatch, is_int, make_rng, sample_without_replacement

SEG_AR_PAD = 0
SEG_AR_SEP = 1
SEG_AR_FIRST_KEY = 2


def segment_ar_layout(n_key_symbols: int = 16, n_values: int = 16) -> dict[str, int]:
    """Token-id layout: pad, sep, first key symbol, first value and the minimum vocab size."""
    first_value = SEG_AR_FIRST_KEY + n_key_symbols
    return {"pad": SEG_AR_PAD, "sep": SEG_AR_SEP, "first_key": SEG_AR_FIRST_KEY,
            "first_value": first_value, "min_vocab_size": first_value + n_values}


def _errors(num_examples, num_pairs, segment_len, vocab_size, key_len, n_key_symbols, n_values,
            rewrite, key_pool_size) -> list[str]:
    errs: list[str] = []
    for name, v in (("num_examples", num_examples), ("num_pairs", num_pairs), ("segment_len", segment_len),
                    ("vocab_size", vocab_size), ("n_key_symbols", n_key_symbols), ("n_values", n_values)):
        if not is_int(v) or v < 1:
            errs.append(f"{name} must be a positive int (got {v!r})")
    ok_kl = (isinstance(key_len, (tuple, list)) and len(key_len) == 2 and all(is_int(x) for x in key_len)
             and 1 <= key_len[0] <= key_len[1])
    if not ok_kl:
        errs.append(f"key_len must be (min, max) ints with 1 <= min <= max (got {key_len!r})")
    if key_pool_size is not None and not rewrite:
        errs.append("key_pool_size only applies with rewrite=True")
    if errs:
        return errs
    lo, hi = key_len
    min_vocab = segment_ar_layout(n_key_symbols, n_values)["min_vocab_size"]
    if vocab_size < min_vocab:
        errs.append(f"vocab_size must be >= 2 + n_key_symbols + n_values = {min_vocab} (got {vocab_size})")
    if segment_len < hi + 2:
        errs.append(f"segment_len must be >= max key length + 2 = {hi + 2} (got {segment_len})")
    n_keys = sum(n_key_symbols ** length for length in range(lo, hi + 1))
    if n_keys >= 2 ** 62:
        errs.append(f"key space too large ({n_key_symbols}^{hi} strings); lower key_len or n_key_symbols")
    elif not rewrite and num_pairs > n_keys:
        errs.append(f"num_pairs={num_pairs} exceeds the {n_keys} distinct keys of length {lo}..{hi}")
    if rewrite:
        if num_pairs < 2:
            errs.append(f"rewrite=True needs num_pairs >= 2 so a key can repeat (got {num_pairs})")
        if n_values < 2:
            errs.append(f"rewrite=True needs n_values >= 2 so a re-write can change the value (got {n_values})")
        pool = key_pool_size if key_pool_size is not None else max(1, num_pairs // 2)
        if not is_int(pool) or not 1 <= pool <= max(1, num_pairs - 1) or pool > n_keys:
            errs.append(f"key_pool_size must be an int in [1, min(num_pairs - 1, {n_keys})] (got {pool!r})")
    return errs


def _decode_keys(idx: np.ndarray, lo: int, hi: int, n_sym: int) -> tuple[np.ndarray, np.ndarray]:
    """Key index -> (symbols padded with -1 to hi, lengths). Indices enumerate length lo first."""
    syms = np.full(idx.shape + (hi,), -1, dtype=np.int64)
    lens = np.empty(idx.shape, dtype=np.int64)
    start = 0
    for length in range(lo, hi + 1):
        count = n_sym ** length
        m = (idx >= start) & (idx < start + count)
        rem = idx[m] - start
        lens[m] = length
        for pos in range(length - 1, -1, -1):  # most significant symbol first
            syms[m, pos] = rem % n_sym
            rem //= n_sym
        start += count
    return syms, lens


def segment_ar(
    num_examples: int,
    num_pairs: int,
    segment_len: int,
    vocab_size: int,
    seed: Seed,
    key_len: tuple[int, int] = (1, 3),
    n_key_symbols: int = 16,
    n_values: int = 16,
    rewrite: bool = False,
    *,
    key_pool_size: int | None = None,
) -> SyntheticBatch:
    """Generate segment-level associative retrieval examples (layout in the module docstring).

    Returns inputs/labels of shape (N, (num_pairs + 1) * segment_len). Raises ``ConfigError``
    (a ``ValueError``) listing every problem (vocab too small, segment_len < max key len + 2, ...).

    ``meta``: ``segment_len``, ``num_segments``, ``write_keys`` (N, num_pairs, max_len; symbol
    indices, -1 padded), ``write_key_lens`` and ``write_values`` (N, num_pairs; value tokens),
    ``query_key`` (N, max_len) / ``query_key_len`` (N,), ``answer`` (N,; value token),
    ``answer_segment`` (N,; index of the write segment holding the answer, the latest write of
    the key), ``first_segment`` (N,; its first write), ``label_position`` (N,; the query SEP's
    absolute position) and the token layout.
    """
    errs = _errors(num_examples, num_pairs, segment_len, vocab_size, key_len, n_key_symbols, n_values,
                   rewrite, key_pool_size)
    if errs:
        raise ConfigError(errs, "segment_ar configuration")
    rng = make_rng(seed)
    n, p, S = num_examples, num_pairs, segment_len
    lo, hi = key_len
    n_keys = sum(n_key_symbols ** length for length in range(lo, hi + 1))
    rows = np.arange(n)

    if not rewrite:
        key_idx = sample_without_replacement(rng, n, p, n_keys)
        values = rng.integers(0, n_values, size=(n, p), dtype=np.int64)
    else:
        pool_size = key_pool_size if key_pool_size is not None else max(1, p // 2)
        pool = sample_without_replacement(rng, n, pool_size, n_keys)
        slot = rng.integers(0, pool_size, size=(n, p), dtype=np.int64)
        key_idx = np.take_along_axis(pool, slot, axis=1)
        values = np.empty((n, p), dtype=np.int64)
        current = np.full((n, pool_size), -1, dtype=np.int64)  # latest value per pool key
        for j in range(p):
            cur = current[rows, slot[:, j]]
            seen = cur >= 0
            r = rng.integers(0, n_values - 1, size=n, dtype=np.int64)
            fresh = rng.integers(0, n_values, size=n, dtype=np.int64)
            values[:, j] = np.where(seen, r + (r >= cur), fresh)  # uniform over values != cur
            current[rows, slot[:, j]] = values[:, j]

    qseg = rng.integers(0, p, size=n, dtype=np.int64)
    qkey = key_idx[rows, qseg]
    same = key_idx == qkey[:, None]
    answer_seg = p - 1 - np.argmax(same[:, ::-1], axis=1)
    first_seg = np.argmax(same, axis=1)
    answer = SEG_AR_FIRST_KEY + n_key_symbols + values[rows, answer_seg]

    syms, lens = _decode_keys(key_idx, lo, hi, n_key_symbols)
    segs = np.full((n, p + 1, S), SEG_AR_PAD, dtype=np.int64)
    sym_tok = np.where(syms >= 0, SEG_AR_FIRST_KEY + syms, SEG_AR_PAD)
    segs[:, :p, :hi] = sym_tok
    np.put_along_axis(segs[:, :p], lens[..., None], SEG_AR_SEP, axis=2)
    np.put_along_axis(segs[:, :p], lens[..., None] + 1,
                      (SEG_AR_FIRST_KEY + n_key_symbols + values)[..., None], axis=2)
    q_syms, q_len = syms[rows, qseg], lens[rows, qseg]
    segs[:, p, :hi] = sym_tok[rows, qseg]
    segs[rows, p, q_len] = SEG_AR_SEP

    inputs = segs.reshape(n, (p + 1) * S)
    labels = np.full_like(inputs, IGNORE_INDEX)
    label_pos = p * S + q_len
    labels[rows, label_pos] = answer

    meta = {
        "task": "segment_ar", "segment_len": S, "num_segments": p + 1, "num_pairs": p,
        "rewrite": bool(rewrite), "write_keys": syms, "write_key_lens": lens,
        "write_values": SEG_AR_FIRST_KEY + n_key_symbols + values, "query_key": q_syms,
        "query_key_len": q_len, "answer": answer, "answer_segment": answer_seg,
        "first_segment": first_seg, "label_position": label_pos,
        **segment_ar_layout(n_key_symbols, n_values),
    }
    return SyntheticBatch(inputs, labels, meta)
