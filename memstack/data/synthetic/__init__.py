"""Deterministic, offline synthetic tasks for memory evaluation.

* :func:`mqar` — Zoology's multi-query associative recall (in-context recall at scale).
* :func:`passkey` / :func:`passkey_grid` — passkey retrieval in real-text filler.
* :func:`segment_ar` — ARMT-style one-pair-per-segment retrieval, with a rewrite variant.

All return :class:`SyntheticBatch` (int64 ``inputs``/``labels`` of shape (N, L); labels already
shifted, -100 = no loss; ``meta`` with per-task details). Same arguments + seed give identical
arrays in any process.
"""
from ._common import IGNORE_INDEX, SyntheticBatch, make_rng, sample_without_replacement
from .mqar import mqar, mqar_config_errors, power_law_gap_probs
from .passkey import (PASSKEY_ANSWER, PASSKEY_NEEDLE, PASSKEY_PREFIX, PASSKEY_QUESTION, PasskeyCell,
                      passkey, passkey_grid)
from .segment_ar import SEG_AR_FIRST_KEY, SEG_AR_PAD, SEG_AR_SEP, segment_ar, segment_ar_layout

__all__ = [
    "IGNORE_INDEX", "SyntheticBatch", "make_rng", "sample_without_replacement",
    "mqar", "mqar_config_errors", "power_law_gap_probs",
    "PASSKEY_PREFIX", "PASSKEY_NEEDLE", "PASSKEY_QUESTION", "PASSKEY_ANSWER", "PasskeyCell",
    "passkey", "passkey_grid",
    "SEG_AR_PAD", "SEG_AR_SEP", "SEG_AR_FIRST_KEY", "segment_ar", "segment_ar_layout",
]
