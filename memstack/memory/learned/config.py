"""Configs of the learned-memory family (kept apart from the modules so that reading a YAML
file imports nothing heavy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

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


# ---- recurrent memory tokens and associative memories (RMT, ARMT, Infini-attention, HMT) --------

@dataclass(frozen=True)
class RMTConfig(MemoryConfig):
    """Recurrent Memory Transformer: read tokens before, write tokens after every segment."""

    kind: ClassVar[str] = "rmt"
    n_tokens: int = 8          # memory tokens (read = write = the carried memory)
    init_std: float = 0.02     # the learned initial memory

    def check(self) -> list[str]:
        r = [] if self.n_tokens >= 1 else [f"n_tokens must be >= 1, got {self.n_tokens}"]
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r


@dataclass(frozen=True)
class ARMTConfig(MemoryConfig):
    """Associative Recurrent Memory Transformer: a per-layer associative matrix written by delta rule."""

    kind: ClassVar[str] = "armt"
    n_tokens: int = 4                       # write tokens appended to every segment (learned, constant)
    d_mem: int = 16                         # key/query projection width before the DPFP feature map
    nu: int = 3                             # DPFP order: feature width = 2 * nu * d_mem
    correction: bool = True                 # the paper's new-information normaliser update (gamma)
    eps: float = 1e-5
    init_std: float = 0.02
    layers: tuple[int, ...] | None = None   # layers with an associative memory; None: all

    def check(self) -> list[str]:
        r = []
        for name in ("n_tokens", "d_mem", "nu"):
            if getattr(self, name) < 1:
                r.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nu >= 1 and self.d_mem >= 1 and self.nu > 2 * self.d_mem:
            r.append(f"nu ({self.nu}) must be <= 2 * d_mem ({2 * self.d_mem}) (DPFP rolls the 2*d_mem features)")
        if self.eps <= 0:
            r.append(f"eps must be > 0, got {self.eps}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)


@dataclass(frozen=True)
class InfiniConfig(MemoryConfig):
    """Infini-attention: per-head compressive memory (linear attention) gated with local attention."""

    kind: ClassVar[str] = "infini"
    rule: Literal["linear", "delta"] = "delta"
    gate_init: float = -3.0                 # sigmoid(-3) = 0.047: start close to local attention
    eps: float = 1e-6
    layers: tuple[int, ...] | None = None   # layers with memory; None: all

    def check(self) -> list[str]:
        r = [] if self.rule in ("linear", "delta") else [f"rule must be 'linear' or 'delta', got {self.rule!r}"]
        if self.eps <= 0:
            r.append(f"eps must be > 0, got {self.eps}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)


@dataclass(frozen=True)
class HMTConfig(MemoryConfig):
    """Hierarchical Memory Transformer: sensory tokens, a recalled memory token, a memory cache."""

    kind: ClassVar[str] = "hmt"
    n_sensory: int = 8          # last tokens of the previous segment prepended (sensory memory)
    n_summary: int = 8          # last tokens of the previous segment the summary pass reads
    cache_size: int = 16        # past memory embeddings kept for recall (FIFO)
    d_recall: int | None = None  # width of the recall attention's query/key projections; None: d_model
    init_std: float = 0.02

    def check(self) -> list[str]:
        r = []
        for name in ("n_sensory", "n_summary", "cache_size"):
            if getattr(self, name) < 0 or (name != "n_sensory" and getattr(self, name) < 1):
                r.append(f"{name} must be >= {0 if name == 'n_sensory' else 1}, got {getattr(self, name)}")
        if self.d_recall is not None and self.d_recall < 1:
            r.append(f"d_recall must be >= 1 or null, got {self.d_recall}")
        if self.init_std <= 0:
            r.append(f"init_std must be > 0, got {self.init_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        keep = max(self.n_sensory, self.n_summary)
        return [] if keep <= backbone.seg_len else [
            f"n_sensory and n_summary ({keep}) must be <= seg_len ({backbone.seg_len}): they are read from the previous segment"]


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
