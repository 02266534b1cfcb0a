"""Errors memstack raises on bad input. Each says what was wrong and what to do."""
from __future__ import annotations


class MemstackError(Exception):
    """Base class for memstack's user-facing errors."""


class ConfigError(MemstackError, ValueError):
    """An invalid configuration. Carries *every* reason at once in `reasons`."""

    def __init__(self, reasons: list[str] | str, what: str = "configuration"):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"invalid {what} ({len(self.reasons)} problem(s)):\n{lines}")


class UnknownNameError(MemstackError, KeyError):
    """An unknown memory / task / preset name; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        self.name, self.valid = name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind} names: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class AssetError(MemstackError):
    """A data asset is missing, corrupted or does not match its SHA-256 pin."""


class CheckpointError(MemstackError):
    """A checkpoint or saved memory state is corrupted or does not match the model."""


class IntegrityError(CheckpointError):
    """A stored file failed its integrity check: missing, truncated, edited, of another kind or
    format, or not matching the checksum its parent document records. The message names the file."""
