"""Long-context evaluation: BABILong-style and RULER-style tasks (memstack/data/synthetic/longctx.py)
trained at `train_len` tokens (<= 1k) and evaluated from there to a million tokens and more.

Training examples use Jane Austen's novels as the haystack; evaluation uses Moby Dick (so no
model can pass by memorising its haystack), read cyclically past its end. `evaluate(model, "val")`
scores `n_test` examples at `train_len` (what the harness chooses on); `evaluate(model, "test")`
scores the same at `train_len` and then every length of `lengths`, each with its number of
examples from `examples` -- **streamed segment by segment**: an example is generated one segment
at a time from a few spans (facts, question, filler offsets), the model carries only its memory
state, so a 1,048,576-token evaluation needs the memory of one segment (peak RSS is measured and
reported as `rss_mb@L`). A progress bar counts the tokens.

Metrics: `exact` (every answer token right, teacher-forced = greedy decoding's answer) and its
binomial standard error `exact_se` at `train_len`; per length L: `exact@L`, `exact_se@L`, the
Wilson 95 % interval `exact_lo@L` / `exact_hi@L` (honest with 8 examples, where the binomial
error degenerates), `seconds@L` and `rss_mb@L`. Chance is 1 / (answer choices): 1/6 for qa1's
locations, 1/900 for a three-digit number.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from memstack.data.synthetic.longctx import VARIANTS, LongBatch, long_batch
from memstack.evals.bench import peak_rss_mb
from memstack.evals.task import GeneratedSource, Task, TaskConfig, check_split, tokenizer_reasons, tokenizer_vocab
from memstack.memory.base import Step

MAX_TRAIN_LEN = 1024


@dataclass(frozen=True)
class LongContextTaskConfig(TaskConfig):
    kind: ClassVar[str] = "longctx"
    variant: str = "babilong_qa1"
    n_facts: int = 2
    tokenizer: str = "bpe512"
    train_len: int = 512                       # tokens per training example (<= 1024)
    lengths: tuple[int, ...] = (1024, 4096, 16384, 65536, 262144, 1048576)
    examples: tuple[int, ...] = (64, 64, 32, 16, 8, 8)   # evaluation examples per length
    n_test: int = 256                          # examples at train_len, per split
    train_filler: Literal["austen", "moby_dick"] = "austen"
    eval_filler: Literal["austen", "moby_dick"] = "moby_dick"
    seed: int = 0
    follow_curriculum: bool = False            # train on min(n_segments * seg_len, train_len) tokens when asked for n segments
    progress: bool = True

    @property
    def label(self) -> str:
        return self.variant

    def vocab_size(self) -> int:
        return tokenizer_vocab(self.tokenizer)

    def context_tokens(self) -> int:
        return max((self.train_len, *self.lengths))

    def check(self) -> list[str]:
        r = tokenizer_reasons(self.tokenizer)
        if self.variant not in VARIANTS:
            r.append(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 1 <= self.train_len <= MAX_TRAIN_LEN:
            r.append(f"train_len must be in [1, {MAX_TRAIN_LEN}] (models are trained on <= 1k tokens), got {self.train_len}")
        if len(self.lengths) != len(self.examples):
            r.append(f"lengths ({len(self.lengths)}) and examples ({len(self.examples)}) must pair up")
        if any(L < 1 for L in self.lengths) or any(n < 1 for n in self.examples):
            r.append("lengths and examples must be positive")
        if self.n_facts < 1 or self.n_test < 1:
            r.append(f"n_facts and n_test must be >= 1, got {self.n_facts}, {self.n_test}")
        if self.variant == "vt" and self.n_facts > 16:
            r.append("vt chains at most 16 variables")
        return r


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@torch.no_grad()
def stream_exact(model: nn.Module, batch: LongBatch, seg_len: int, progress: bool = False,
                 desc: str = "") -> np.ndarray:
    """(rows,) bool: every answer token predicted right, the examples fed segment by segment."""
    dev = model.device
    n_seg = -(-batch.length // seg_len)
    state = model.init_state(batch.rows, dev)
    ok = np.ones(batch.rows, dtype=bool)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=batch.length * batch.rows, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                   leave=False)
    first = torch.ones(batch.rows, dtype=torch.bool, device=dev)
    later = torch.zeros(batch.rows, dtype=torch.bool, device=dev)
    for i in range(n_seg):
        x, y = batch.segment(i, seg_len)
        out, state = model(torch.from_numpy(x).to(dev), state, Step(reset=first if i == 0 else later))
        lab = y != -100
        if lab.any():
            pred = out.logits.argmax(-1).cpu().numpy()
            ok &= ~((pred != y) & lab).any(axis=1)
        if bar:
            bar.update(seg_len * batch.rows)
    if bar:
        bar.close()
    return ok


class LongContextTask(Task):
    primary = "exact"
    higher_is_better = True

    @cached_property
    def tokenizer(self):
        from memstack.data.tokenizers import get_tokenizer

        return get_tokenizer(self.cfg.tokenizer)

    def filler(self, which: str) -> np.ndarray:
        from memstack.evals.passkey import filler_ids

        cache = self.__dict__.setdefault("_fillers", {})
        if which not in cache:
            cache[which] = filler_ids(self.tokenizer, which)
        return cache[which]

    def batch(self, rows: int, length: int, seed, filler: str) -> LongBatch:
        c = self.cfg
        return long_batch(self.tokenizer, self.filler(filler), c.variant, rows, length, seed, n_facts=c.n_facts)

    def train_source(self, rows: int, seed: int, rank: int = 0, world: int = 1) -> GeneratedSource:
        c = self.cfg

        segs = -(-c.train_len // self.seg_len)

        def make(n_segments: int, n: int, s):
            # a curriculum's (or vary_segments') length, never beyond train_len: trained on <= 1k tokens
            length = min(n_segments * self.seg_len, c.train_len) if c.follow_curriculum else c.train_len
            x, y = self.batch(n, length, (c.seed, *s), c.train_filler).materialize(self.seg_len)
            return x, y

        return GeneratedSource(make, rows, self.seg_len, seed=seed, pad_id=self.tokenizer.eot_id, rank=rank, world=world,
                               segments=(lambda n: min(n, segs)) if c.follow_curriculum else (lambda n: segs))

    @cached_property
    def _short(self) -> dict[str, LongBatch]:
        c = self.cfg
        return {split: self.batch(c.n_test, c.train_len, c.seed + salt, c.eval_filler)
                for split, salt in (("val", 2_000_003), ("test", 1_000_003))}

    def evaluate(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        split = check_split(split)
        c = self.cfg
        out = self.evaluate_reference(model, split)
        if split == "test":
            for L, n in zip(c.lengths, c.examples):
                out.update(self.evaluate_length(model, L, n))
        return out

    def evaluate_reference(self, model: nn.Module, split: str | None = None) -> dict[str, float]:
        """At the trained length only (a warm start's description; the sweep is for the cells)."""
        ok = stream_exact(model, self._short[check_split(split)], self.seg_len)
        return {"exact": float(ok.mean()), "exact_se": math.sqrt(ok.mean() * (1 - ok.mean()) / len(ok))}

    def length_batch(self, length: int, n: int, split: str = "test") -> LongBatch:
        """The n evaluation examples of `length` tokens of a split (test: the seeds of the records so far)."""
        c = self.cfg
        salt = {"test": 1_000_003, "val": 2_000_003}[check_split(split)]
        return self.batch(n, length, (c.seed + salt, length), c.eval_filler)

    def evaluate_length(self, model: nn.Module, length: int, n: int, split: str = "test") -> dict[str, float]:
        """Exact match on n streamed examples of `length` tokens (evaluation filler; the split's
        own seed: choices made at a length -- lr, checkpoint, design -- use "val")."""
        c = self.cfg
        batch = self.length_batch(length, n, split)
        reset_peak_rss()
        t0 = time.perf_counter()
        ok = stream_exact(model, batch, self.seg_len, progress=c.progress, desc=f"{c.variant} @ {length:,}")
        k = int(ok.sum())
        lo, hi = wilson(k, n)
        p = k / n
        return {f"exact@{length}": p, f"exact_se@{length}": math.sqrt(p * (1 - p) / n), f"exact_lo@{length}": lo,
                f"exact_hi@{length}": hi, f"n@{length}": n, f"seconds@{length}": time.perf_counter() - t0,
                f"rss_mb@{length}": peak_rss_mb()}

    def chance(self) -> float:
        return 1.0 / self._short["test"].choices

    def data_arrays(self):
        for split, b in self._short.items():
            x, y = b.materialize(self.seg_len)
            yield f"{split}.inputs", x
            yield f"{split}.labels", y
        for which in sorted({self.cfg.train_filler, self.cfg.eval_filler}):
            yield f"filler.{which}", self.filler(which)
