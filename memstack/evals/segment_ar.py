"""Segment-level associative retrieval (ARMT, arXiv 2407.04841): one key-value pair per segment,
the query in a final segment -- answerable only through memory that crosses segments. The
`rewrite` variant repeats keys; the latest value must be returned. Segments are the backbone's
`seg_len`. Metric: accuracy of the answer token."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from torch import nn

from memstack.data.packing import ExampleSource
from memstack.data.synthetic import segment_ar, segment_ar_layout
from memstack.evals.task import Task, TaskConfig, accuracy_metrics, example_predictions


@dataclass(frozen=True)
class SegmentARTaskConfig(TaskConfig):
    kind: ClassVar[str] = "segment_ar"
    vocab: int = 64
    num_pairs: int = 4
    rewrite: bool = False
    n_key_symbols: int = 16
    n_values: int = 16
    n_train: int = 20000
    n_test: int = 1000
    seed: int = 0

    def vocab_size(self) -> int:
        return self.vocab

    def context_tokens(self) -> int:
        return 0  # depends on seg_len; the harness passes (num_pairs + 1) * seg_len

    def check(self) -> list[str]:
        r = []
        need = segment_ar_layout(self.n_key_symbols, self.n_values)["min_vocab_size"]
        if self.vocab < need:
            r.append(f"vocab must be >= {need} for {self.n_key_symbols} key symbols and {self.n_values} values")
        if self.num_pairs < 1:
            r.append(f"num_pairs must be >= 1, got {self.num_pairs}")
        if self.n_train < 1 or self.n_test < 1:
            r.append(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        return r


class SegmentARTask(Task):
    primary = "acc"
    higher_is_better = True

    def _data(self, n: int, seed: int):
        c = self.cfg
        return segment_ar(n, c.num_pairs, self.seg_len, c.vocab, seed, n_key_symbols=c.n_key_symbols,
                          n_values=c.n_values, rewrite=c.rewrite)

    @cached_property
    def test(self):
        return self._data(self.cfg.n_test, self.cfg.seed + 1_000_003)

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> ExampleSource:
        d = self._data(self.cfg.n_train, self.cfg.seed)
        return ExampleSource(d.inputs, d.labels, rows, self.seg_len, seed=seed, rank=rank, world=world)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        correct, mask = example_predictions(model, self.test.inputs, self.test.labels, self.seg_len)
        return accuracy_metrics(correct, mask)
