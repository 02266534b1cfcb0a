"""Cross-segment slot recall: typed facts in the context segments, queried in the last segment.

An example is ``n_context + 1`` segments of ``segment_len`` tokens. Every slot j of
``n_slots`` gets one value per example; the context segments hold the pairs
``MARK_j value_j`` (in random order, at random even offsets, among noise tokens); the last
segment asks ``n_queries`` distinct slots in the same form, with the label at ``MARK_j`` = the
value::

    context :  z z MARK_3 v3 z z z MARK_0 v0 z ... MARK_1 v1 z z    (labels all -100)
    query   :  z MARK_1 v1 z z z MARK_3 v3 z z ...                    (label at MARK_j = v_j)

Token ids: ``PAD = 0``; marker of slot j at ``1 + j``; value v of slot j at
``1 + n_slots + j * n_values + v`` (each slot has its own range of values: a value's token
says which slot it fills, the way "Paris" says it is a city); noise tokens after that. So
``vocab_size = 1 + n_slots + n_slots * n_values + n_noise``.

Why typed values: a 2-layer attention model learns to read "the value of slot j in my context"
in a few hundred steps (one content-addressed attention hop), where untyped associative recall
(MQAR) needs an induction circuit that takes it thousands of steps to find (measured:
docs/benchmarks/recall.md). The values are uniform and independent of everything else in the
example, so a model that cannot see the context segments is at chance, ``1 / n_values``, on
every query -- queries ask distinct slots, and the query segment holds no other copy of the
value. What a memory must carry across the segment boundary: ``n_slots`` values,
``n_slots * log2(n_values)`` bits.
"""
from __future__ import annotations

import numpy as np

from memstack.errors import ConfigError

from ._common import IGNORE_INDEX, Seed, SyntheticBatch, is_int, make_rng, sample_without_replacement

SLOT_PAD = 0


def slot_recall_layout(n_slots: int, n_values: int, n_noise: int) -> dict[str, int]:
    """Token-id layout: first marker, first value, first noise token and the vocabulary size."""
    first_value = 1 + n_slots
    first_noise = first_value + n_slots * n_values
    return {"pad": SLOT_PAD, "first_marker": 1, "first_value": first_value, "first_noise": first_noise,
            "vocab_size": first_noise + n_noise}


def slot_recall_errors(num_examples, segment_len, n_slots, n_values, n_noise, n_context, n_queries) -> list[str]:
    """Every problem with a configuration (empty when valid)."""
    errs = []
    ok = {}
    for name, v in (("num_examples", num_examples), ("segment_len", segment_len), ("n_slots", n_slots),
                    ("n_values", n_values), ("n_noise", n_noise), ("n_context", n_context),
                    ("n_queries", n_queries)):
        if not is_int(v) or v < 1:
            errs.append(f"{name} must be a positive int (got {v!r})")
        else:
            ok[name] = v
    S, K, V, C, Q = (ok.get(n) for n in ("segment_len", "n_slots", "n_values", "n_context", "n_queries"))
    if S is not None and S % 2:
        errs.append(f"segment_len must be even (pairs sit at even offsets), got {S}")
    if V is not None and V < 2:
        errs.append(f"n_values must be >= 2 (chance is 1 / n_values), got {V}")
    if Q is not None and K is not None and Q > K:
        errs.append(f"n_queries ({Q}) must be <= n_slots ({K}): queries ask distinct slots")
    if K is not None and C is not None and S is not None and 2 * K > C * S:
        errs.append(f"{K} pairs need {2 * K} tokens, more than the {C} context segment(s) of {S} hold")
    if Q is not None and S is not None and 2 * Q > S:
        errs.append(f"{Q} queries need {2 * Q} tokens, more than one segment of {S}")
    return errs


def slot_recall(num_examples: int, segment_len: int, seed: Seed, *, n_slots: int = 8, n_values: int = 32,
                n_noise: int = 64, n_context: int = 1, n_queries: int | None = None) -> SyntheticBatch:
    """Generate examples (layout in the module docstring); shape (N, (n_context + 1) * segment_len).

    Raises ``ConfigError`` listing every problem. ``meta``: ``values`` (N, n_slots; value index
    per slot, 0..n_values-1), ``pair_positions`` (N, n_slots; absolute position of each slot's
    marker in the context), ``query_slots`` / ``query_positions`` (N, n_queries) and the layout.
    """
    n_queries = n_slots if n_queries is None else n_queries
    errs = slot_recall_errors(num_examples, segment_len, n_slots, n_values, n_noise, n_context, n_queries)
    if errs:
        raise ConfigError(errs, "slot_recall configuration")
    lay = slot_recall_layout(n_slots, n_values, n_noise)
    rng = make_rng(seed)
    n, S, K, Q = num_examples, segment_len, n_slots, n_queries
    L = (n_context + 1) * S
    rows = np.arange(n)[:, None]
    values = rng.integers(0, n_values, size=(n, K), dtype=np.int64)
    value_tok = lay["first_value"] + np.arange(K) * n_values + values                    # (n, K)
    pair_slot = sample_without_replacement(rng, n, K, n_context * S // 2)                 # (n, K) even offsets / 2
    q_slots = sample_without_replacement(rng, n, Q, K)                                    # (n, Q) which slots
    q_pos = np.sort(sample_without_replacement(rng, n, Q, S // 2), axis=1)                # (n, Q) offsets / 2
    inputs = lay["first_noise"] + rng.integers(0, n_noise, size=(n, L), dtype=np.int64)
    labels = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    marker = lay["first_marker"] + np.arange(K)
    pair_pos = 2 * pair_slot
    inputs[rows, pair_pos] = marker[None, :]
    inputs[rows, pair_pos + 1] = value_tok
    qp = n_context * S + 2 * q_pos
    inputs[rows, qp] = lay["first_marker"] + q_slots
    answer = np.take_along_axis(value_tok, q_slots, axis=1)
    inputs[rows, qp + 1] = answer
    labels[rows, qp] = answer
    meta = {"task": "slot_recall", "values": values, "pair_positions": pair_pos, "query_slots": q_slots,
            "query_positions": qp, "segment_len": S, "n_context": n_context, "n_slots": K, "n_values": n_values,
            "chance": 1.0 / n_values, **lay}
    return SyntheticBatch(inputs, labels, meta)
