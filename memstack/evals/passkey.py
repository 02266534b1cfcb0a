"""Passkey retrieval (Mohtashami & Jaggi, arXiv 2305.16300) over a depth x length grid, with
real-text filler: training filler from Jane Austen's novels, evaluation filler from Moby Dick
(so a model cannot pass by memorising the haystack). Training examples have `train_len`
tokens and a random depth; the grid goes beyond it. Inputs longer than `seg_len` are processed
in segments, so the needle must be carried by memory. Metric: exact match of the key
(teacher-forced argmax on every answer token = greedy decoding's output).

Curriculum: with `follow_curriculum`, training examples are generated per batch with exactly
n_segments * seg_len tokens when the trainer asks for n segments (TrainConfig.curriculum /
vary_segments set the training length; `train_len` and `n_train` are then unused)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
from torch import nn

from memstack.data.packing import ExampleSource
from memstack.data.synthetic import passkey, passkey_grid
from memstack.evals.task import (GeneratedSource, Task, TaskConfig, accuracy_metrics, check_split,
                                 example_predictions, tokenizer_reasons, tokenizer_vocab)


@dataclass(frozen=True)
class PasskeyTaskConfig(TaskConfig):
    kind: ClassVar[str] = "passkey"
    tokenizer: str = "bpe512"
    train_len: int = 256
    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_cell: int = 20
    n_train: int = 10000
    n_digits: int = 5
    train_filler: Literal["austen", "moby_dick"] = "austen"
    eval_filler: Literal["austen", "moby_dick"] = "moby_dick"
    seed: int = 0
    follow_curriculum: bool = False   # train on n_segments * seg_len tokens when asked for n segments

    def vocab_size(self) -> int:
        return tokenizer_vocab(self.tokenizer)

    def context_tokens(self) -> int:
        return max(self.lengths)

    def check(self) -> list[str]:
        r = tokenizer_reasons(self.tokenizer)
        if not 1 <= self.n_digits <= 18:
            r.append(f"n_digits must be in [1, 18], got {self.n_digits}")
        if not self.lengths or min(self.lengths) < 1:
            r.append(f"lengths must be non-empty and positive, got {self.lengths}")
        if any(not 0 <= d <= 1 for d in self.depths) or not self.depths:
            r.append(f"depths must be in [0, 1], got {self.depths}")
        for name in ("per_cell", "n_train", "train_len"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        return r


def filler_ids(tokenizer, which: str) -> np.ndarray:
    from memstack.data import corpora

    docs = corpora.austen() if which == "austen" else [corpora.moby_dick()]
    return np.asarray(tokenizer.encode("\n".join(d.text for d in docs)), dtype=np.int64)


class PasskeyTask(Task):
    primary = "exact"
    higher_is_better = True

    @cached_property
    def tokenizer(self):
        from memstack.data.tokenizers import get_tokenizer

        return get_tokenizer(self.cfg.tokenizer)

    @cached_property
    def grid(self):
        c = self.cfg
        return passkey_grid(self.tokenizer, filler_ids(self.tokenizer, c.eval_filler), c.lengths, c.depths,
                            c.per_cell, c.seed + 1_000_003, n_digits=c.n_digits)

    @cached_property
    def val_grid(self):
        """The validation grid: same filler book and cells, other keys and filler offsets."""
        c = self.cfg
        return passkey_grid(self.tokenizer, filler_ids(self.tokenizer, c.eval_filler), c.lengths, c.depths,
                            c.per_cell, c.seed + 2_000_003, n_digits=c.n_digits)

    @cached_property
    def train_data(self):
        """The fixed training set, generated once per task (deterministic by cfg.seed; every cell
        of a suite trains on it)."""
        c = self.cfg
        return passkey(self.tokenizer, filler_ids(self.tokenizer, c.train_filler), c.n_train, c.train_len, None,
                       c.seed, n_digits=c.n_digits)

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1):
        c = self.cfg
        if c.follow_curriculum:
            filler = filler_ids(self.tokenizer, c.train_filler)

            def make(n_segments: int, n: int, s):
                d = passkey(self.tokenizer, filler, n, n_segments * self.seg_len, None, (c.seed, *s),
                            n_digits=c.n_digits)
                return d.inputs, d.labels

            return GeneratedSource(make, rows, self.seg_len, seed=seed, pad_id=self.tokenizer.eot_id, rank=rank,
                                   world=world)
        d = self.train_data
        return ExampleSource(d.inputs, d.labels, rows, self.seg_len, pad_id=self.tokenizer.eot_id, seed=seed,
                             rank=rank, world=world)

    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        exact = []
        for cell in (self.val_grid if check_split(split) == "val" else self.grid):
            correct, mask = example_predictions(model, cell.batch.inputs, cell.batch.labels, self.seg_len)
            m = accuracy_metrics(correct, mask)
            out[f"exact@{cell.length}/{cell.depth:g}"] = m["exact"]
            exact.append(m["exact"])
        out["exact"] = float(np.mean(exact))
        for L in self.cfg.lengths:
            vals = [out[f"exact@{L}/{d:g}"] for d in self.cfg.depths]
            out[f"exact@{L}"] = float(np.mean(vals))
        return out

    def chance(self) -> float:
        return 1.0 / (9 * 10 ** (self.cfg.n_digits - 1))    # a uniform guess of the key

    def data_arrays(self):
        parts = [] if self.cfg.follow_curriculum else [("train", self.train_data)]
        parts += [(f"{name}@{cell.length}/{cell.depth:g}", cell.batch)
                  for name, grid in (("val", self.val_grid), ("test", self.grid)) for cell in grid]
        for name, d in parts:
            yield f"{name}.inputs", d.inputs
            yield f"{name}.labels", d.labels
