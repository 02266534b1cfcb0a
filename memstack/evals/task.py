"""What a task is: a config (registered by `kind`), a training source and an evaluation.

Every task trains and evaluates through the same segment protocol as the model: examples longer
than the backbone's `seg_len` are processed as consecutive segments with the memory state
carried between them, so a task longer than one segment can only be solved through memory.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from memstack.config import Checked
from memstack.data.packing import IGNORE, ExampleSource
from memstack.data.tokenizers import tokenizer_reasons, tokenizer_vocab  # noqa: F401 (their home is data/)
from memstack.memory.base import Step


@dataclass(frozen=True)
class TaskConfig(Checked):
    """Base of every task's config; subclasses set `kind` (the registry name)."""

    kind: ClassVar[str] = ""

    @property
    def label(self) -> str:
        """The task's name in records and leaderboards (default: `kind`); a variant that a suite
        may list beside its plain version names itself apart (segment_ar_rewrite)."""
        return self.kind

    def vocab_size(self) -> int:
        """The vocabulary the model needs for this task."""
        raise NotImplementedError

    def context_tokens(self) -> int:
        """Tokens of context an evaluation example spans (where state size is reported)."""
        raise NotImplementedError


SPLITS = ("val", "test")


class Task:
    """Subclasses set the metric names and implement `train_source`, `evaluate` and `data_arrays`.

    Every task has a validation and a test split, disjoint from its training data and from each
    other: the harness chooses (learning rate, checkpoint) on `evaluate(model, "val")` and
    reports `evaluate(model, "test")`. `split=None` is the task's default (test; the LM task's
    `eval_split`)."""

    primary: ClassVar[str] = ""            # the metric the leaderboard ranks by
    higher_is_better: ClassVar[bool] = True

    def __init__(self, cfg: TaskConfig, seg_len: int, layout_seg_len: int | None = None):
        # seg_len: the window the model processes at once; layout_seg_len: the segment length the
        # task's examples are laid out for (tasks with one fact per segment), by default the same.
        # A warm start trains the plain backbone on the suite's examples with a wider window.
        self.cfg, self.seg_len = cfg, seg_len
        self.layout_seg_len = layout_seg_len or seg_len

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> Any:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        raise NotImplementedError

    def context_tokens(self) -> int:
        """Tokens of context an evaluation example spans at this task's segment length."""
        return self.cfg.context_tokens()

    def evaluate_reference(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        """The metrics a warm start records about itself (default: `evaluate`); a task whose test
        evaluation is long (a length sweep) keeps it short here."""
        return self.evaluate(model, split)

    def chance(self) -> float | None:
        """The primary metric of a model that cannot see what the task asks about (None: not defined)."""
        return None

    def data_arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for every piece of data the task trains and evaluates on, in a fixed order
        (what `data_sha256` hashes)."""
        raise NotImplementedError

    def data_sha256(self) -> str:
        """SHA-256 over the task's training, validation and test data (names, dtypes, shapes and
        bytes): two runs with the same digest saw the same data."""
        h = hashlib.sha256(b"memstack-task-data-v1\n")
        for name, a in self.data_arrays():
            a = np.ascontiguousarray(a)
            h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
            h.update(a.tobytes())
        return h.hexdigest()


def check_split(split: str | None, default: str = "test") -> str:
    split = default if split is None else split
    if split not in SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; valid: {', '.join(SPLITS)}")
    return split


class GeneratedSource:
    """Examples generated per batch at the segment count the trainer asks for -- what lets a
    task follow `TrainConfig.curriculum` / `vary_segments` (ExampleSource has a fixed length).

    make(n_segments, n_examples, seed) -> (inputs, labels) int64 arrays of shape
    (n_examples, L) with L <= (segments the batch has) * seg_len; `segments(n)` says how many
    segments a batch for n has (a task may add a query segment). Batch b is generated from
    seed (seed, b), so the stream is deterministic and resumes exactly (state = batches served).
    Under data parallelism every rank generates the global batch and keeps its rows.
    """

    def __init__(self, make, rows: int, seg_len: int, *, seed: int = 0, pad_id: int = 0, rank: int = 0, world: int = 1,
                 segments=lambda n: n):
        if rows % world:
            raise ValueError(f"rows ({rows}) must be divisible by the number of processes ({world})")
        self.make, self.rows, self.seg_len, self.seed, self.pad_id = make, rows, seg_len, seed, pad_id
        self.segments = segments
        self.lo, self.hi = rank * rows // world, (rank + 1) * rows // world
        self.served = 0

    def next(self, n_segments: int) -> "Batch":
        from memstack.data.packing import Batch

        inputs, labels = self.make(n_segments, self.rows, (self.seed, self.served))
        self.served += 1
        N = self.segments(n_segments)
        L = inputs.shape[1]
        if L > N * self.seg_len:
            raise ValueError(f"generated examples of {L} tokens do not fit {N} segments of {self.seg_len}")
        pad = N * self.seg_len - L
        x = np.pad(inputs, ((0, 0), (0, pad)), constant_values=self.pad_id).reshape(self.rows, N, self.seg_len)
        y = np.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(self.rows, N, self.seg_len)
        reset = np.zeros((self.rows, N), dtype=bool)
        reset[:, 0] = True
        sl = slice(self.lo, self.hi)
        return Batch(torch.from_numpy(x[sl].copy()), torch.from_numpy(y[sl].copy()), torch.from_numpy(reset[sl].copy()))

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, d: dict) -> None:
        self.served = int(d["served"])


def build_task(cfg: TaskConfig, seg_len: int, layout_seg_len: int | None = None) -> Task:
    from memstack.registry import TASKS

    return TASKS.target_class(cfg.kind)(cfg, seg_len, layout_seg_len)


@torch.no_grad()
def example_predictions(model: nn.Module, inputs: np.ndarray, labels: np.ndarray, seg_len: int,
                        batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced argmax predictions for examples processed segment by segment.

    Returns (correct (E, L) bool, mask (E, L) bool) where mask marks labelled positions. With
    teacher forcing, "every answer token correct" is exactly greedy decoding's exact match.
    """
    src = ExampleSource(inputs, labels, batch_size, seg_len, shuffle=False, loop=False)
    E, L = inputs.shape
    correct = np.zeros((E, src.n_segments * seg_len), dtype=bool)
    row = 0
    dev = model.device
    while not src.exhausted:
        b = src.next().to(dev)
        state = model.init_state(b.tokens.shape[0], dev)
        preds = []
        for n in range(b.tokens.shape[1]):
            out, state = model(b.tokens[:, n], state, Step(reset=b.reset[:, n]))
            preds.append(out.logits.argmax(-1))
        pred = torch.cat(preds, 1)                                     # (b, N*S)
        tgt = b.targets.reshape(b.targets.shape[0], -1)
        correct[row:row + len(pred)] = (pred == tgt).cpu().numpy()
        row += len(pred)
    mask = labels != IGNORE
    return correct[:, :L] & mask, mask


def accuracy_metrics(correct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Token accuracy over labelled positions and exact match over examples."""
    n = mask.sum()
    per_ex = (correct | ~mask).all(axis=1)
    return {"acc": float(correct.sum() / max(n, 1)), "exact": float(per_ex.mean()) if len(per_ex) else math.nan}
