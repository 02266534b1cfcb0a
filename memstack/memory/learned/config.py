"""Configs of the learned-memory family (kept apart from the modules so that reading a YAML
file imports nothing heavy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memstack.config import BackboneConfig, MemoryConfig, _layers_reasons


@dataclass(frozen=True)
class MemoryTokensConfig(MemoryConfig):
    """Learned tokens prepended to every segment (non-recurrent)."""

    kind: ClassVar[str] = "memory_tokens"
    n_tokens: int = 8          # memory tokens per segment
    init_std: float = 0.02

    def check(self) -> list[str]:
        r = []
        if self.n_tokens < 1:
            r.append(f"n_tokens must be >= 1, got {self.n_tokens}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r


@dataclass(frozen=True)
class XLConfig(MemoryConfig):
    """Transformer-XL segment recurrence."""

    kind: ClassVar[str] = "xl"
    mem_len: int = 64                       # hidden states kept per layer (FIFO over tokens)
    layers: tuple[int, ...] | None = None   # layers with memory; None: all

    @property
    def holds_context(self) -> bool:
        return True

    def check(self) -> list[str]:
        return [] if self.mem_len >= 1 else [f"mem_len must be >= 1, got {self.mem_len}"]

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)
