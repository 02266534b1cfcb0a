"""Segment-level associative retrieval (ARMT, arXiv 2407.04841): one key-value pair per segment,
the query in a final segment -- answerable only through memory that crosses segments. The
`rewrite` variant repeats keys; the latest value must be returned. Segments are the backbone's
`seg_len`. Metric: accuracy of the answer token.

Longer than trained: `eval_pairs` adds test sets with other pair counts (acc@P each), e.g. 4x
the trained segments. Curriculum: with `follow_curriculum`, training examples are generated per
batch with as many pairs as the trainer asks for segments (n pair segments + the query segment),
so `TrainConfig.curriculum` (1 -> 2 -> 4 ...) and `vary_segments` set the training length;
`num_pairs` and `n_train` then only describe the main test set."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from torch import nn

from memstack.data.packing import ExampleSource
from memstack.data.synthetic import segment_ar, segment_ar_layout
from memstack.evals.task import GeneratedSource, Task, TaskConfig, accuracy_metrics, check_split, example_predictions


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
    eval_pairs: tuple[int, ...] = ()    # extra test sets at these pair counts (acc@P)
    follow_curriculum: bool = False     # train on n pairs when the trainer asks for n segments

    @property
    def label(self) -> str:
        return "segment_ar_rewrite" if self.rewrite else "segment_ar"

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
        if any(p < 1 or (self.rewrite and p < 2) for p in self.eval_pairs):
            r.append(f"eval_pairs must be >= {2 if self.rewrite else 1}, got {list(self.eval_pairs)}")
        if self.n_train < 1 or self.n_test < 1:
            r.append(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        return r


class SegmentARTask(Task):
    primary = "acc"
    higher_is_better = True

    def _data(self, n: int, seed, pairs: int | None = None):
        c = self.cfg
        return segment_ar(n, pairs or c.num_pairs, self.layout_seg_len, c.vocab, seed, n_key_symbols=c.n_key_symbols,
                          n_values=c.n_values, rewrite=c.rewrite)

    @cached_property
    def test(self):
        return self._data(self.cfg.n_test, self.cfg.seed + 1_000_003)

    @cached_property
    def val(self):
        return self._data(self.cfg.n_test, self.cfg.seed + 2_000_003)

    def test_at(self, pairs: int, split: str = "test"):
        """The test (or validation) set with `pairs` pairs (the main one at num_pairs)."""
        if pairs == self.cfg.num_pairs:
            return self.val if split == "val" else self.test
        cache = self.__dict__.setdefault("_tests", {})
        base = 2_000_003 if split == "val" else 1_000_003
        if (split, pairs) not in cache:
            cache[(split, pairs)] = self._data(self.cfg.n_test, (self.cfg.seed + base, pairs), pairs)
        return cache[(split, pairs)]

    @cached_property
    def train_data(self):
        return self._data(self.cfg.n_train, self.cfg.seed)

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1):
        if self.cfg.follow_curriculum:
            def make(n_segments: int, n: int, s):
                if self.cfg.rewrite and n_segments < 2:
                    raise ValueError(f"segment_ar with rewrite needs >= 2 pair segments per example, the trainer "
                                     f"asked for {n_segments} (start the curriculum / min_segments at 2)")
                d = self._data(n, (self.cfg.seed, *s), n_segments)
                return d.inputs, d.labels

            return GeneratedSource(make, rows, self.seg_len, seed=seed, rank=rank, world=world,
                                   segments=lambda n: n + 1)
        d = self.train_data
        return ExampleSource(d.inputs, d.labels, rows, self.seg_len, seed=seed, rank=rank, world=world)

    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        split = check_split(split)
        main = self.test_at(self.cfg.num_pairs, split)
        correct, mask = example_predictions(model, main.inputs, main.labels, self.seg_len)
        out = accuracy_metrics(correct, mask)
        for p in self.cfg.eval_pairs:
            d = self.test_at(p, split)
            c, m = example_predictions(model, d.inputs, d.labels, self.seg_len)
            out[f"acc@{p}"] = accuracy_metrics(c, m)["acc"]
        return out

    def chance(self) -> float:
        return 1.0 / self.cfg.n_values

    def context_tokens(self) -> int:
        return (self.cfg.num_pairs + 1) * self.layout_seg_len

    def data_arrays(self):
        parts = [] if self.cfg.follow_curriculum else [("train", self.train_data)]
        for split in ("val", "test"):
            parts += [(f"{split}@{p}", self.test_at(p, split)) for p in (self.cfg.num_pairs, *self.cfg.eval_pairs)]
        for name, d in parts:
            yield f"{name}.inputs", d.inputs
            yield f"{name}.labels", d.labels
