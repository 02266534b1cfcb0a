"""`none`: no memory. The plain backbone; each segment sees only itself.

Registered so the leaderboard and the contract tests treat the baseline like any other memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memstack.config import MemoryConfig
from memstack.memory.base import Memory


@dataclass(frozen=True)
class NoMemoryConfig(MemoryConfig):
    kind: ClassVar[str] = "none"


class NoMemory(Memory):
    """The plain backbone (declares no sites)."""

    def make_identity(self) -> bool:
        return True
