"""Configs of the runtime-memory (KV cache) family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from memstack.config import MemoryConfig


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
