"""Paged attention: decode (one query per sequence, K/V read through block tables) and prefill.

    paged_decode(q, k_cache, v_cache, block_tables, starts, lens)   -> (B, H, D)
    paged_prefill(q, k_cache, v_cache, block_table, start, end)     -> (T, H, D)

Decode dispatches to the Triton kernel on CUDA (when it takes the shape), else to the torch
gather + SDPA path; `set_impl("reference" | "torch" | "triton")` forces one (tests, benchmarks).
Prefill gathers the sequence's context and runs SDPA. Nothing is probed at import time and
triton is imported only when its path runs.
"""
from __future__ import annotations

from torch import Tensor

from memstack.ops.paged_attention.reference import gather_kv, paged_decode_ref, paged_prefill_ref
from memstack.ops.paged_attention.torch_impl import paged_decode_torch, paged_prefill_sdpa

_override: str | None = None
_VALID = ("reference", "torch", "triton")


def set_impl(name: str | None) -> None:
    global _override
    if name is not None and name not in _VALID:
        raise ValueError(f"unknown paged attention impl {name!r}; valid: {list(_VALID)}")
    _override = name


def decode_impl(q: Tensor, k_cache: Tensor) -> str:
    """The implementation `paged_decode` uses for these inputs."""
    if _override:
        return _override
    if q.is_cuda:
        from memstack.ops.paged_attention.triton_decode import supports

        if not supports(q, k_cache):
            return "triton"
    return "torch"


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, starts: Tensor, lens: Tensor,
                 scale: float | None = None) -> Tensor:
    impl = decode_impl(q, k_cache)
    if impl == "triton":
        from memstack.ops.paged_attention.triton_decode import paged_decode_triton

        return paged_decode_triton(q, k_cache, v_cache, block_tables, starts, lens, scale)
    fn = paged_decode_ref if impl == "reference" else paged_decode_torch
    return fn(q, k_cache, v_cache, block_tables, starts, lens, scale)


def paged_prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int) -> Tensor:
    if _override == "reference":
        return paged_prefill_ref(q, k_cache, v_cache, block_table, start, end)
    return paged_prefill_sdpa(q, k_cache, v_cache, block_table, start, end)


__all__ = ["paged_decode", "paged_prefill", "paged_decode_ref", "paged_prefill_ref", "paged_decode_torch",
           "paged_prefill_sdpa", "gather_kv", "set_impl", "decode_impl"]
