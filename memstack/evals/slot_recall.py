"""Cross-segment slot recall (memstack/data/synthetic/slot_recall.py): `n_slots` typed facts in
the context segment(s), asked in the last segment. The backbone alone sees only the query
segment, so it is at chance (1 / n_values); a memory is above chance exactly as far as it
carries the facts across the segment boundary. Metric: accuracy over queried values
(teacher-forced argmax = greedy decoding's answer), its standard error `acc_se` (binomial, over
the queries), and `exact` (every query of an example right).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from torch import nn

from memstack.data.packing import ExampleSource
from memstack.data.synthetic.slot_recall import slot_recall, slot_recall_errors, slot_recall_layout
from memstack.evals.task import Task, TaskConfig, accuracy_metrics, check_split, example_predictions


@dataclass(frozen=True)
class SlotRecallTaskConfig(TaskConfig):
    kind: ClassVar[str] = "slot_recall"
    n_slots: int = 8             # facts per example (all queried unless n_queries is set)
    n_values: int = 32           # values per slot: chance = 1 / n_values
    n_noise: int = 64            # noise tokens between the pairs
    n_context: int = 1           # context segments before the query segment
    n_queries: int | None = None
    n_train: int = 20000
    n_test: int = 512            # examples per evaluation split (val and test)
    seed: int = 0

    def vocab_size(self) -> int:
        return slot_recall_layout(self.n_slots, self.n_values, self.n_noise)["vocab_size"]

    def context_tokens(self) -> int:
        return 0   # (n_context + 1) segments: depends on the segment length (SlotRecallTask.context_tokens)

    def check(self) -> list[str]:
        q = self.n_slots if self.n_queries is None else self.n_queries
        r = slot_recall_errors(1, 2 * max(self.n_slots, q, 1), self.n_slots, self.n_values, self.n_noise,
                               self.n_context, q)
        if self.n_train < 1 or self.n_test < 1:
            r.append(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        return r


class SlotRecallTask(Task):
    primary = "acc"
    higher_is_better = True

    def _data(self, n: int, seed):
        c = self.cfg
        return slot_recall(n, self.layout_seg_len, seed, n_slots=c.n_slots, n_values=c.n_values, n_noise=c.n_noise,
                           n_context=c.n_context, n_queries=c.n_queries)

    @cached_property
    def train_data(self):
        return self._data(self.cfg.n_train, self.cfg.seed)

    @cached_property
    def val(self):
        return self._data(self.cfg.n_test, self.cfg.seed + 2_000_003)

    @cached_property
    def test(self):
        return self._data(self.cfg.n_test, self.cfg.seed + 1_000_003)

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> ExampleSource:
        d = self.train_data
        return ExampleSource(d.inputs, d.labels, rows, self.seg_len, seed=seed, rank=rank, world=world)

    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        d = self.val if check_split(split) == "val" else self.test
        correct, mask = example_predictions(model, d.inputs, d.labels, self.seg_len)
        out = accuracy_metrics(correct, mask)
        n = int(mask.sum())
        out["acc_se"] = math.sqrt(max(out["acc"] * (1 - out["acc"]), 0.0) / max(n, 1))
        out["n_queries"] = n
        return out

    def chance(self) -> float:
        return 1.0 / self.cfg.n_values

    def context_tokens(self) -> int:
        return (self.cfg.n_context + 1) * self.layout_seg_len

    def data_arrays(self):
        for name in ("train_data", "val", "test"):
            d = getattr(self, name)
            yield f"{name}.inputs", d.inputs
            yield f"{name}.labels", d.labels
