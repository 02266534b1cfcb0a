"""Configs of the runtime-memory (KV cache) family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from memstack.config import BackboneConfig, MemoryConfig, _layers_reasons


@dataclass(frozen=True)
class DenseKVConfig(MemoryConfig):
    """A dense KV cache.

    scope="segment": holds the keys/values of the current segment only and is cleared when the
    next segment starts -- the decode cache that makes token-by-token generation equal to a
    one-shot forward over the segment (generation adds one automatically when needed).
    scope="document": keeps past segments' keys/values too (stop-gradient in training): full
    attention over the document, or a sliding window of `window` tokens (trimmed at segment ends).
    """

    kind: ClassVar[str] = "kv_dense"
    scope: Literal["segment", "document"] = "document"
    window: int | None = None        # document scope: past tokens kept at segment ends; None = all
    initial_capacity: int = 64       # inference buffers start here and double when full

    @property
    def holds_context(self) -> bool:
        return self.scope == "document"

    def check(self) -> list[str]:
        r = []
        if self.scope not in ("segment", "document"):
            r.append(f"scope must be 'segment' or 'document', got {self.scope!r}")
        if self.window is not None and self.scope != "document":
            r.append("window applies to scope='document' only")
        if self.window is not None and self.window < 1:
            r.append(f"window must be >= 1 or null, got {self.window}")
        if self.initial_capacity < 1:
            r.append(f"initial_capacity must be >= 1, got {self.initial_capacity}")
        return r


@dataclass(frozen=True)
class TrellisConfig(MemoryConfig):
    """Trellis learned bounded KV memory (arXiv 2512.23852): per layer and KV head, `slots` key
    and value slots written by test-time gradient steps with a learned forget gate, read by every
    query and added to the attention output through a learned per-head gate; beside it an exact
    window of the last `window` past tokens (0: only the current segment is exact). Tokens leave
    the exact window into the slots. The state is fixed in size, whatever the context length."""

    kind: ClassVar[str] = "trellis"
    slots: int = 32                          # m: key/value slots per layer and KV head
    window: int = 0                          # exact past tokens kept beyond the current segment
    layers: tuple[int, ...] | None = None    # layers with a memory; None: all
    init_alpha: float = 0.02                 # forget gate alpha_t at initialisation (bias of its sigmoid)
    init_theta: float = 0.3                  # inner step size theta_t at initialisation
    init_key_std: float = 1.0                # std of the learned initial key slots
    gate_init: float = 0.0                   # output gate per query head (0: starts as the identity)
    write_chunk: int = 16                    # tokens whose pass-1 addresses share one state (1: per token)

    @property
    def holds_context(self) -> bool:
        return self.window > 0

    def check(self) -> list[str]:
        r = []
        if self.slots < 1:
            r.append(f"slots must be >= 1, got {self.slots}")
        if self.window < 0:
            r.append(f"window must be >= 0, got {self.window}")
        for name in ("init_alpha", "init_theta"):
            if not 0 < getattr(self, name) < 1:
                r.append(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.write_chunk < 1:
            r.append(f"write_chunk must be >= 1, got {self.write_chunk}")
        if self.init_key_std <= 0:
            r.append(f"init_key_std must be > 0, got {self.init_key_std}")
        return r

    def check_with(self, backbone: BackboneConfig) -> list[str]:
        return _layers_reasons(self.layers, backbone)
