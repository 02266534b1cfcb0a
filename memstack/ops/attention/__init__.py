"""Attention op: `attention(q, k, v, mask)` dispatches to SDPA; `attention_ref` is the reference.

`set_impl("reference")` forces the reference (tests); nothing is probed at import time.
"""
from __future__ import annotations

from torch import Tensor

from memstack.ops.attention.reference import attention_ref
from memstack.ops.attention.sdpa import attention_sdpa

_IMPLS = {"sdpa": attention_sdpa, "reference": attention_ref}
_override: str | None = None


def set_impl(name: str | None) -> None:
    """Force an implementation ("sdpa" | "reference"), or None for the default."""
    global _override
    if name is not None and name not in _IMPLS:
        raise ValueError(f"unknown attention impl {name!r}; valid: {sorted(_IMPLS)}")
    _override = name


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    return _IMPLS[_override or "sdpa"](q, k, v, mask)


__all__ = ["attention", "attention_ref", "attention_sdpa", "set_impl"]
