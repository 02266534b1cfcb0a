"""Row gather with a sparse table gradient: `gather_rows(table, idx)`.

Implementations: "torch" (index_select; CPU and GPU, the default), "triton" (ops/gather/triton.py,
the default on CUDA when Triton is installed), "reference" (plain torch, obvious). Every one
returns the same values and the same sparse COO gradient for the table: only the rows looked
up receive gradient and no dense (R, D) gradient is ever allocated.

`prefetched=`: rows already gathered elsewhere (an offloaded table's prefetch, or a sharded
table's all-to-all); the op then only wires the sparse gradient back to `table`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from memstack.ops.gather.reference import gather_rows_ref, sparse_row_grad

_IMPLS = ("torch", "triton", "reference")
_override: str | None = None


def set_impl(name: str | None) -> None:
    """Force an implementation ("torch" | "triton" | "reference"), or None for the default."""
    global _override
    if name is not None and name not in _IMPLS:
        raise ValueError(f"unknown gather impl {name!r}; valid: {list(_IMPLS)}")
    _override = name


def _default_impl(table: Tensor) -> str:
    if table.is_cuda:
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "torch"
    return "torch"


def gather_torch(table: Tensor, idx: Tensor) -> Tensor:
    """index_select; with misses, on the clamped ids with the misses zeroed in place."""
    if idx.numel() == 0 or int(idx.min()) >= 0:                       # the common case: plain index_select
        return table.index_select(0, idx)
    out = table.index_select(0, idx.clamp(min=0))                     # (N, D)
    miss = idx < 0
    if bool(miss.any()):
        out[miss] = 0
    return out


def _forward(table: Tensor, idx: Tensor) -> Tensor:
    impl = _override or _default_impl(table)
    if impl == "triton":
        from memstack.ops.gather.triton import gather_rows_triton

        return gather_rows_triton(table, idx)
    if impl == "reference":
        return gather_rows_ref(table, idx)
    return gather_torch(table, idx)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, idx: Tensor, prefetched: Tensor | None) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.shape, ctx.device = table.shape, table.device
        if prefetched is not None:
            return prefetched.detach().view_as(prefetched)
        return _forward(table.detach(), idx)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (idx,) = ctx.saved_tensors
        g = None
        if ctx.needs_input_grad[0]:
            g = sparse_row_grad(grad_out, idx.to(grad_out.device), ctx.shape, device=ctx.device)
        return g, None, None


def gather_rows(table: Tensor, idx: Tensor, prefetched: Tensor | None = None) -> Tensor:
    """table (R, D), idx (...) int64 in [-1, R) -> (..., D); idx < 0 gives a zero row.
    The gradient w.r.t. `table` is a sparse COO tensor (R, D) on table's device."""
    shape = idx.shape
    flat = idx.reshape(-1)
    if prefetched is not None:
        prefetched = prefetched.reshape(flat.shape[0], table.shape[1])
    if torch.is_grad_enabled() and table.requires_grad:
        out = _GatherRows.apply(table, flat, prefetched)
    else:
        out = prefetched if prefetched is not None else _forward(table, flat)
    return out.reshape(*shape, table.shape[1])


__all__ = ["gather_rows", "gather_rows_ref", "gather_torch", "sparse_row_grad", "set_impl"]
