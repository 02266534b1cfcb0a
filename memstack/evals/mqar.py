"""Zoology multi-query associative recall (Arora et al., arXiv 2312.04927).

The sequence (`seq_len` tokens, Zoology's parameters) is processed in segments of the
backbone's `seg_len`: when seq_len > seg_len, queries in later segments can only be answered
through memory. Metric: accuracy over queried values (teacher-forced argmax), as Zoology reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from torch import nn

from memstack.data.packing import ExampleSource
from memstack.data.synthetic import mqar, mqar_config_errors
from memstack.evals.task import Task, TaskConfig, accuracy_metrics, check_split, example_predictions


@dataclass(frozen=True)
class MQARTaskConfig(TaskConfig):
    kind: ClassVar[str] = "mqar"
    vocab: int = 512
    seq_len: int = 128
    num_kv_pairs: int = 8
    power_a: float = 0.01
    n_train: int = 20000
    n_test: int = 1000
    seed: int = 0

    def vocab_size(self) -> int:
        return self.vocab

    def context_tokens(self) -> int:
        return self.seq_len

    def check(self) -> list[str]:
        r = mqar_config_errors(1, self.seq_len, self.num_kv_pairs, self.vocab, self.power_a)
        if self.n_train < 1 or self.n_test < 1:
            r.append(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        return r


class MQARTask(Task):
    primary = "acc"
    higher_is_better = True

    def _data(self, n: int, seed: int):
        c = self.cfg
        return mqar(n, c.seq_len, c.num_kv_pairs, c.vocab, seed, power_a=c.power_a)

    @cached_property
    def test(self):
        return self._data(self.cfg.n_test, self.cfg.seed + 1_000_003)

    @cached_property
    def val(self):
        return self._data(self.cfg.n_test, self.cfg.seed + 2_000_003)

    @cached_property
    def train_data(self):
        """The fixed training set, generated once per task (every cell of a suite trains on it)."""
        return self._data(self.cfg.n_train, self.cfg.seed)

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> ExampleSource:
        d = self.train_data
        return ExampleSource(d.inputs, d.labels, rows, self.seg_len, seed=seed, rank=rank, world=world)

    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        d = self.val if check_split(split) == "val" else self.test
        correct, mask = example_predictions(model, d.inputs, d.labels, self.seg_len)
        return accuracy_metrics(correct, mask)

    def chance(self) -> float:
        return 1.0 / (self.cfg.vocab - self.cfg.vocab // 2)   # a uniform guess among the value tokens

    def data_arrays(self):
        for name in ("train_data", "val", "test"):
            d = getattr(self, name)
            yield f"{name}.inputs", d.inputs
            yield f"{name}.labels", d.labels
