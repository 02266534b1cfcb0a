"""Synthetic facts: closed-book recall of key -> value facts seen in training, beside an
in-context variant of the same format (the Engram paper's §6.3 contrast, on our harness).

A fact is "the code of <key> is <value>." where keys (two pseudo-words) and values (one
pseudo-word) are built from random syllables -- synthetic, so no model can know them from
elsewhere. Training examples (one segment of `seq_len` tokens each) are either
- closed-book: statements of the task's fixed `n_facts` facts, packed in random order; or
- in-context (fraction `icl_frac`): statements of fresh random pairs, then one of them repeated,
  so the value can only be copied from the context.
Every token is trained on (next-token loss). Evaluation (teacher-forced exact match of the value
tokens = greedy decoding's answer):
- fact_acc: "the code of <key> is" -> <value> for every fact, with nothing else in context:
  answerable only from what the parameters (or tables) memorised;
- icl_acc: fresh pairs in context, then a query: answerable only by reading the context.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
from torch import nn

from memstack.data.packing import IGNORE, ExampleSource
from memstack.evals.task import (Task, TaskConfig, accuracy_metrics, check_split, example_predictions, tokenizer_reasons,
                                 tokenizer_vocab)

_CONS = "bdfgklmnprstvz"
_VOWS = "aeiou"


def pseudo_word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(_CONS[rng.integers(len(_CONS))] + _VOWS[rng.integers(len(_VOWS))] for _ in range(syllables))


def make_facts(n: int, seed: int) -> list[tuple[str, str]]:
    """n distinct (key, value) pairs, deterministic in seed."""
    rng = np.random.default_rng([seed, 7])
    out, keys = [], set()
    while len(out) < n:
        key = f"{pseudo_word(rng, 2)} {pseudo_word(rng, 2)}"
        if key in keys:
            continue
        keys.add(key)
        out.append((key, pseudo_word(rng, 2)))
    return out


@dataclass(frozen=True)
class FactsTaskConfig(TaskConfig):
    kind: ClassVar[str] = "facts"
    tokenizer: str = "bpe512"
    n_facts: int = 200
    seq_len: int = 128            # tokens per example (use seg_len >= seq_len: one segment, no memory needed for ICL)
    icl_frac: float = 0.5         # share of in-context training examples
    icl_pairs: int = 2            # fresh pairs stated before an in-context query
    n_train: int = 20000
    n_icl_test: int = 200
    seed: int = 0

    def vocab_size(self) -> int:
        return tokenizer_vocab(self.tokenizer)

    def context_tokens(self) -> int:
        return self.seq_len

    def check(self) -> list[str]:
        r = tokenizer_reasons(self.tokenizer)
        for name in ("n_facts", "seq_len", "icl_pairs", "n_train", "n_icl_test"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.icl_frac <= 1:
            r.append(f"icl_frac must be in [0, 1], got {self.icl_frac}")
        return r


def statement(key: str, value: str) -> str:
    return f"the code of {key} is {value}."


class FactsTask(Task):
    primary = "fact_acc"
    higher_is_better = True

    @cached_property
    def tokenizer(self):
        from memstack.data.tokenizers import get_tokenizer

        return get_tokenizer(self.cfg.tokenizer)

    @cached_property
    def facts(self) -> list[tuple[str, str]]:
        return make_facts(self.cfg.n_facts, self.cfg.seed)

    def _enc(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _row(self, pieces: list[tuple[str, bool]], truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate text pieces (text, labelled) into one example: [eot] + tokens, cut/padded to
        seq_len; labels are the next tokens inside labelled pieces (all pieces when training)."""
        L, eot = self.cfg.seq_len, self.tokenizer.eot_id
        ids, lab = [eot], [False]
        for text, labelled in pieces:
            t = self._enc(text)
            ids += t
            lab += [labelled] * len(t)
        if any(lab[L + 1:]) and not truncate:
            raise ValueError(f"a facts example needs {len(ids) - 1} tokens but seq_len is {L}; raise seq_len "
                             "or lower icl_pairs")
        ids, lab = ids[: L + 1], lab[: L + 1]
        x = np.full(L, eot, dtype=np.int64)
        y = np.full(L, IGNORE, dtype=np.int64)
        x[: len(ids) - 1] = ids[:-1]
        tgt = np.asarray(ids[1:], dtype=np.int64)
        y[: len(tgt)] = np.where(np.asarray(lab[1:], dtype=bool), tgt, IGNORE)
        return x, y

    def _icl_pieces(self, rng: np.random.Generator, train: bool) -> list[tuple[str, bool]]:
        pairs = [(f"{pseudo_word(rng, 2)} {pseudo_word(rng, 2)}", pseudo_word(rng, 2)) for _ in range(self.cfg.icl_pairs)]
        key, value = pairs[rng.integers(len(pairs))]
        pieces = [(statement(k, v) + " ", train) for k, v in pairs]
        return pieces + [(f"the code of {key} is", train), (f" {value}.", True)]

    def _closed_pieces(self, rng: np.random.Generator) -> list[tuple[str, bool]]:
        order = rng.permutation(len(self.facts))
        return [(statement(*self.facts[i]) + " ", True) for i in order[:8]]

    def train_arrays(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, seed, 11])
        rows = [(self._row(self._icl_pieces(rng, True)) if rng.random() < self.cfg.icl_frac
                else self._row(self._closed_pieces(rng), truncate=True))
                for _ in range(n)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    @cached_property
    def fact_test(self) -> tuple[np.ndarray, np.ndarray]:
        rows = [self._row([(f"the code of {k} is", False), (f" {v}.", True)]) for k, v in self.facts]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    @cached_property
    def icl_test(self) -> tuple[np.ndarray, np.ndarray]:
        return self._icl_set(1_000_003)

    @cached_property
    def icl_val(self) -> tuple[np.ndarray, np.ndarray]:
        return self._icl_set(2_000_003)

    def _icl_set(self, salt: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, salt, 13])
        rows = [self._row(self._icl_pieces(rng, False)) for _ in range(self.cfg.n_icl_test)]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> ExampleSource:
        x, y = self.train_arrays(self.cfg.n_train, self.cfg.seed)
        return ExampleSource(x, y, rows, self.seg_len, pad_id=self.tokenizer.eot_id, seed=seed, rank=rank, world=world)

    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        """fact_acc asks the trained facts themselves (closed-book recall has no held-out facts:
        it is the same on both splits); icl_acc uses fresh pairs, other ones per split."""
        out = {}
        icl = self.icl_val if check_split(split) == "val" else self.icl_test
        for name, (x, y) in (("fact", self.fact_test), ("icl", icl)):
            correct, mask = example_predictions(model, x, y, self.seg_len)
            m = accuracy_metrics(correct, mask)
            out[f"{name}_acc"], out[f"{name}_token_acc"] = m["exact"], m["acc"]
        return out

    def data_arrays(self):
        x, y = self.train_arrays(self.cfg.n_train, self.cfg.seed)
        for name, (a, b) in (("train", (x, y)), ("fact", self.fact_test), ("icl_val", self.icl_val),
                             ("icl_test", self.icl_test)):
            yield f"{name}.inputs", a
            yield f"{name}.labels", b
