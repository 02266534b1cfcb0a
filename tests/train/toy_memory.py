"""Tiny test-only memories for the trainer tests (registered by fixtures, removed afterwards).

- `ToyRecurrent` (EMBED): an RMT-style recurrent memory whose state carries gradient. Each
  segment gets a read token `read + proj(mem)` prepended and a write token appended; the write
  token's final hidden state (it sees the whole segment, causally) becomes the next `mem`. So
  the loss of segment n reaches the token embeddings of every earlier segment whose state was
  not detached on the way.
- `ToyGrouped` (BLOCK): parameters that go to a named optimizer group through `optim_group`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from memstack.config import BackboneConfig, MemoryConfig
from memstack.memory.base import Memory, Site, StepContext

RECURRENT = "toy_recurrent"
GROUPED = "toy_grouped"


@dataclass(frozen=True)
class ToyRecurrentConfig(MemoryConfig):
    kind: ClassVar[str] = RECURRENT
    init_std: float = 0.5


@dataclass
class ToyState:
    mem: Tensor   # (B, D), differentiable inside a step


class ToyRecurrent(Memory):
    """Read token + write token; the write token's final hidden state is the carried state."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.EMBED})

    def __init__(self, cfg: ToyRecurrentConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D = backbone.d_model
        self.read = nn.Parameter(torch.randn(D) * cfg.init_std)
        self.write = nn.Parameter(torch.randn(D) * cfg.init_std)
        self.proj = nn.Linear(D, D, bias=False)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ToyState:
        return ToyState(torch.zeros(batch, self.backbone.d_model, device=device, dtype=dtype))

    def reset(self, state: ToyState, mask: Tensor) -> ToyState:
        return ToyState(state.mem.masked_fill(mask[:, None], 0.0))

    def embed(self, x: Tensor, state: ToyState, ctx: StepContext) -> tuple[Tensor, Tensor, ToyState]:
        B, _, D = x.shape
        prefix = (self.read + self.proj(state.mem))[:, None, :]      # (B, 1, D)
        suffix = self.write.expand(B, 1, D)                          # (B, 1, D)
        return prefix, suffix, state

    def embed_out(self, h_prefix: Tensor | None, h_suffix: Tensor | None, state: ToyState, ctx: StepContext) -> ToyState:
        return ToyState(h_suffix[:, 0])                              # (B, D), keeps the graph


@dataclass(frozen=True)
class ToyGroupedConfig(MemoryConfig):
    kind: ClassVar[str] = GROUPED
    rows: int = 16


class ToyGrouped(Memory):
    """A 'table' in its own optimizer group, plus a matrix and a gain that take the default groups."""

    sites: ClassVar[frozenset[Site]] = frozenset({Site.BLOCK})

    def __init__(self, cfg: ToyGroupedConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D = backbone.d_model
        self.table = nn.Parameter(torch.randn(cfg.rows, D) * 0.02)   # -> group "toy_table"
        self.mix = nn.Parameter(torch.randn(D, D) * 0.02)            # -> "decay" (2-D, no group)
        self.gain = nn.Parameter(torch.zeros(1))                     # -> "no_decay" (1-D)

    def block(self, layer: int, h: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor, Any]:
        return h + self.gain * (h @ self.mix) + 0.0 * self.table.sum(), state

    def optim_group(self, name: str) -> str | None:
        return "toy_table" if name == "table" else None


def register(name: str):
    """Register the toy memory `name`; returns a function that removes it again."""
    from memstack.registry import MEMORIES, register_memory

    cls, cfg = {RECURRENT: (ToyRecurrent, ToyRecurrentConfig), GROUPED: (ToyGrouped, ToyGroupedConfig)}[name]
    register_memory(name, config=cfg, replace=True)(cls)
    return lambda: MEMORIES.remove(name)
