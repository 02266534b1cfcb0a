"""Open-domain QA metrics as SQuAD / NQ / RAG / ATLAS report them: exact match and token F1 after
answer normalisation (lower case, punctuation and the articles a/an/the removed, whitespace
collapsed), each the maximum over the gold answers."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, golds: Sequence[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(pred: str, golds: Sequence[str]) -> float:
    p = normalize_answer(pred).split()
    best = 0.0
    for g in golds:
        gt = normalize_answer(g).split()
        if not p or not gt:
            best = max(best, float(p == gt))
            continue
        same = sum((Counter(p) & Counter(gt)).values())
        if same:
            prec, rec = same / len(p), same / len(gt)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best
