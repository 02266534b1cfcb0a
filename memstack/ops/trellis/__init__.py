"""Trellis memory op: `trellis_write` (the test-time update) and `trellis_read`.

`trellis_write` dispatches to the chunked path (parallel inside each chunk) unless
`set_impl("reference")` forces the per-token reference; both are plain torch and run anywhere.
"""
from __future__ import annotations

from torch import Tensor

from memstack.ops.trellis.chunked import trellis_write_chunked
from memstack.ops.trellis.reference import address, trellis_read_ref, trellis_write_ref

_IMPLS = {"chunked": trellis_write_chunked, "reference": trellis_write_ref}
_override: str | None = None


def set_impl(name: str | None) -> None:
    """Force a write implementation ("chunked" | "reference"), or None for the default."""
    global _override
    if name is not None and name not in _IMPLS:
        raise ValueError(f"unknown trellis impl {name!r}; valid: {sorted(_IMPLS)}")
    _override = name


def trellis_write(K0: Tensor, V0: Tensor, k: Tensor, v: Tensor, alpha: Tensor, theta: Tensor,
                  mask: Tensor | None = None, chunk: int = 1) -> tuple[Tensor, Tensor]:
    return _IMPLS[_override or "chunked"](K0, V0, k, v, alpha, theta, mask, chunk=chunk)


trellis_read = trellis_read_ref  # one batched matmul pair: the reference is already the fast path

__all__ = ["address", "set_impl", "trellis_read", "trellis_read_ref", "trellis_write", "trellis_write_chunked",
           "trellis_write_ref"]
