"""TrainConfig: everything about optimisation, plain data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memstack.config import Checked, GroupConfig  # noqa: F401 (GroupConfig: defined with the configs below memory)


@dataclass(frozen=True)
class TrainConfig(Checked):
    lr: float = 1e-3
    min_lr_ratio: float = 0.1              # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    max_steps: int = 200                   # the schedule's length; training stops here ...
    max_tokens: int | None = None          # ... or once this many target tokens were trained on
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0                 # max global grad norm; 0 = off
    batch_size: int = 16                   # global batch (rows); split over data-parallel ranks
    n_segments: int = 1                    # segments per row per step (the BPTT window)
    curriculum: tuple[tuple[int, int], ...] = ()  # ((from_step, n_segments), ...): overrides n_segments
    # each step trains on a segment count drawn uniformly from [min_segments, segments_at(step)]
    # (RMT's --vary_n_segments), from (seed, step): a resumed run draws the same counts
    vary_segments: bool = False
    min_segments: int = 1
    bptt: Literal["full", "truncated", "detached"] = "full"
    bptt_k: int = 1                        # truncated: gradient crosses at most k-1 segment boundaries
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0                    # 0: evaluate only at the end
    ckpt_every: int = 0                    # 0: checkpoint only at the end (when out_dir is set)
    groups: dict[str, GroupConfig] = field(default_factory=dict)  # named groups' settings
    # "all": every parameter trains; "memory": the backbone is frozen (requires_grad off) and only
    # the memories' parameters train (prefix-tuning, tables on a frozen backbone)
    trainable: Literal["all", "memory"] = "all"
    # under torchrun: split every sparse table row-wise over the processes (all-to-all lookups,
    # memory/sparse/shard.py) instead of replicating it; the dense part stays data-parallel
    shard_tables: bool = False
    progress: bool = True

    def check(self) -> list[str]:
        r = []
        if self.lr <= 0:
            r.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            r.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "log_every", "eval_every", "ckpt_every"):
            if getattr(self, name) < 0:
                r.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_steps", "batch_size", "n_segments", "bptt_k", "min_segments"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            r.append(f"max_tokens must be >= 1 or null, got {self.max_tokens}")
        if self.weight_decay < 0:
            r.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            r.append(f"betas must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            r.append(f"grad_clip must be >= 0, got {self.grad_clip}")
        steps = [s for s, _ in self.curriculum]
        if steps and (steps != sorted(steps) or steps[0] != 0):
            r.append(f"curriculum stages must start at step 0 and be sorted by step, got {list(self.curriculum)}")
        if any(n < 1 for _, n in self.curriculum):
            r.append(f"curriculum segment counts must be >= 1, got {list(self.curriculum)}")
        if self.trainable not in ("all", "memory"):
            r.append(f"trainable must be 'all' or 'memory', got {self.trainable!r}")
        for name, g in self.groups.items():
            if not isinstance(g, GroupConfig):
                r.append(f"groups.{name} must be a GroupConfig")
        return r

    def segments_for(self, step: int) -> int:
        """Segments per row that step `step` trains on: `segments_at(step)`, or with vary_segments a
        count drawn uniformly from [min_segments, segments_at(step)] (deterministic in seed, step)."""
        n = self.segments_at(step)
        if not self.vary_segments or n <= self.min_segments:
            return n
        import numpy as np

        rng = np.random.Generator(np.random.PCG64([self.seed, step, 0x5E6]))
        return int(rng.integers(self.min_segments, n + 1))

    def segments_at(self, step: int) -> int:
        """Segments per row at `step` (the curriculum hook: 1 -> 2 -> 4 ... with carried weights)."""
        n = self.n_segments
        for start, count in self.curriculum:
            if step >= start:
                n = count
        return n
