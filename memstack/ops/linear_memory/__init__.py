"""Associative memory op: `linear_memory(q, k, v, M, z, beta, rule=, z_rule=, eps=, block=)`
-> (o, dM, dz). Semantics in reference.py (the per-token loop); chunked.py is the torch
chunkwise-parallel path (the default on CPU); triton.py the fused kernel (the default on CUDA
when Triton is installed). `set_impl("reference" | "chunked" | "triton")` forces one (tests,
benchmarks). Nothing is imported or probed at import time.
"""
from __future__ import annotations

from torch import Tensor

from memstack.ops.linear_memory.chunked import linear_memory_chunked
from memstack.ops.linear_memory.reference import RULES, Z_RULES, linear_memory_ref

IMPLS = ("reference", "chunked", "triton")
_override: str | None = None


def set_impl(name: str | None) -> None:
    """Force an implementation, or None for the default (triton on CUDA if importable, else chunked)."""
    global _override
    if name is not None and name not in IMPLS:
        raise ValueError(f"unknown linear_memory impl {name!r}; valid: {list(IMPLS)}")
    _override = name


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def linear_memory(q: Tensor, k: Tensor, v: Tensor, M: Tensor, z: Tensor, beta: Tensor | None = None, *,
                  rule: str = "linear", z_rule: str = "sum", eps: float = 1e-6,
                  block: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    impl = _override or ("triton" if q.is_cuda and _triton_available() else "chunked")
    if impl == "reference":
        fn = linear_memory_ref
    elif impl == "triton":
        from memstack.ops.linear_memory.triton import linear_memory_triton as fn
    else:
        fn = linear_memory_chunked
    return fn(q, k, v, M, z, beta, rule=rule, z_rule=z_rule, eps=eps, block=block)


def memory_read(q: Tensor, M: Tensor, z: Tensor, eps: float = 1e-6) -> Tensor:
    """Read only: q (B, H, T, dk) against M (B, Hkv, dk, dv), z (B, Hkv, dk) -> (B, H, T, dv) fp32
    (the op with nothing written: what ARMT does before a block)."""
    from memstack.ops.linear_memory.chunked import _read
    import torch

    B, H, T, dk = q.shape
    Hkv = M.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        o = _read(q.float().reshape(B, Hkv, H // Hkv, T, dk), M.float(), z.float(), eps)
    return o.reshape(B, H, T, -1)


__all__ = ["linear_memory", "linear_memory_ref", "linear_memory_chunked", "memory_read", "set_impl", "IMPLS",
           "RULES", "Z_RULES"]
