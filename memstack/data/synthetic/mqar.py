"""Multi-query associative recall (MQAR), compatible with Zoology's ``multiquery_ar``.

Clean-room re-implementation of the task in HazyResearch/zoology ``zoology/data/multiquery_ar.py``
(Arora et al., arXiv 2312.04927) with the same parameter names and semantics; the random streams
differ (we use a private PCG64 generator, not the global NumPy state).

Layout of one example of length ``input_seq_len`` (example with 2 pairs, no random filler)::

    positions  0   1   2   3   4   5   6   7   8 ...
    inputs     k1  v1  k2  v2  0   0   k2  0   0 ...
    labels     -   -   -   -   -   -   v2  -   - ...

* Context: ``num_kv_pairs`` keys drawn without replacement from ``[1, vocab_size // 2)``, each
  followed by its value, drawn without replacement from ``[vocab_size // 2, vocab_size)``. With
  ``num_passes > 1`` (the JRT variant) the whole key/value list is repeated that many times.
* Queries: every key is asked exactly once after the context. Key j (in context order) is placed
  at ``context + 2 * gap_j``, where gap_j are draws without replacement from ``0..space-1``,
  ``space = (input_seq_len - context) // 2``, with weight ``power_a * i ** (power_a - 1)`` for
  gap ``i - 1`` (so short gaps dominate for small ``power_a``; ``power_a = 1`` is uniform).
  The label *at the query position* is the key's value; every other label is -100.
* Filler: every other position is 0, or with ``random_non_queries`` a uniform token from
  ``[0, vocab_size)``.

Random filler and determinability: as in Zoology, filler may coincide with a key or a value token
(e.g. a filler "key" followed by a filler "value"). It never carries a label and never touches
the context or the query slots, and each key is bound exactly once in the context (keys are
distinct; with ``num_passes > 1`` the same bindings repeat), so every labelled answer is
determined by the context alone. A model must learn that only the context binds; we keep
Zoology's filler rather than exclude keys, so accuracies stay comparable with published numbers.
"""
from __future__ import annotations

import numpy as np

from memstack.errors import ConfigError

from ._common import IGNORE_INDEX, Seed, SyntheticBatch, is_int, make_rng, sample_without_replacement


def mqar_config_errors(
    num_examples: int, input_seq_len: int, num_kv_pairs: int, vocab_size: int,
    power_a: float = 0.01, num_passes: int = 1,
) -> list[str]:
    """Every violated constraint of an MQAR configuration (empty when it is valid)."""
    errs: list[str] = []
    ints = {"num_examples": num_examples, "input_seq_len": input_seq_len,
            "num_kv_pairs": num_kv_pairs, "vocab_size": vocab_size, "num_passes": num_passes}
    for name, v in ints.items():
        if not is_int(v) or v < 1:
            errs.append(f"{name} must be a positive int (got {v!r})")
    if not isinstance(power_a, (int, float)) or isinstance(power_a, bool) or not power_a > 0:
        errs.append(f"power_a must be > 0 (got {power_a!r})")
    if errs:  # the relational checks below need sane ints
        return errs
    if input_seq_len % 2 != 0:
        errs.append(f"input_seq_len must be even (got {input_seq_len})")
    if vocab_size <= input_seq_len:
        errs.append(f"vocab_size must be > input_seq_len (got vocab_size={vocab_size}, "
                    f"input_seq_len={input_seq_len})")
    need = 2 * num_kv_pairs * num_passes + 2 * num_kv_pairs
    if need > input_seq_len:
        what = "4*num_kv_pairs" if num_passes == 1 else "2*num_kv_pairs*(num_passes+1)"
        errs.append(f"{what} must be <= input_seq_len (got {need} > {input_seq_len})")
    if num_kv_pairs > vocab_size // 2 - 1:
        errs.append(f"num_kv_pairs must be <= vocab_size//2 - 1 = {vocab_size // 2 - 1} distinct keys "
                    f"(got {num_kv_pairs})")
    return errs


def power_law_gap_probs(space: int, power_a: float) -> np.ndarray:
    """Zoology's gap distribution: p[g] ∝ power_a * (g+1)**(power_a-1) for g in 0..space-1."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def mqar(
    num_examples: int,
    input_seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    seed: Seed,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    *,
    num_passes: int = 1,
) -> SyntheticBatch:
    """Generate ``num_examples`` MQAR sequences (see the module docstring for the layout).

    Raises ``ConfigError`` (a ``ValueError``) listing every violated constraint: input_seq_len
    even, vocab_size > input_seq_len, 4*num_kv_pairs <= input_seq_len (with num_passes:
    2*num_kv_pairs*(num_passes+1) <= input_seq_len).

    ``meta``: ``keys``, ``values``, ``gaps``, ``query_positions`` (each (N, num_kv_pairs), in
    context order) and the scalar arguments.
    """
    errs = mqar_config_errors(num_examples, input_seq_len, num_kv_pairs, vocab_size, power_a, num_passes)
    if errs:
        raise ConfigError(errs, "MQAR configuration")
    rng = make_rng(seed)
    n, k, L = num_examples, num_kv_pairs, input_seq_len
    half = vocab_size // 2
    keys = 1 + sample_without_replacement(rng, n, k, half - 1)
    values = half + sample_without_replacement(rng, n, k, vocab_size - half)

    context = 2 * k * num_passes
    space = (L - context) // 2
    gaps = sample_without_replacement(rng, n, k, space, p=power_law_gap_probs(space, power_a))
    qpos = context + 2 * gaps

    # Filler first (drawn after the gaps), then the context and the queries written over it.
    if random_non_queries:
        inputs = rng.integers(0, vocab_size, size=(n, L), dtype=np.int64)
    else:
        inputs = np.zeros((n, L), dtype=np.int64)
    kv = np.empty((n, 2 * k), dtype=np.int64)
    kv[:, 0::2], kv[:, 1::2] = keys, values
    inputs[:, :context] = np.tile(kv, (1, num_passes))
    np.put_along_axis(inputs, qpos, keys, axis=1)
    labels = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, qpos, values, axis=1)

    meta = {
        "task": "mqar", "keys": keys, "values": values, "gaps": gaps, "query_positions": qpos,
        "input_seq_len": L, "num_kv_pairs": k, "vocab_size": vocab_size, "power_a": power_a,
        "random_non_queries": bool(random_non_queries), "num_passes": num_passes,
        "context_len": context,
    }
    return SyntheticBatch(inputs, labels, meta)
