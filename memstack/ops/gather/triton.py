"""Row gather as a Triton kernel: one program per block of BLOCK_N rows x BLOCK_D columns,
masked at the edges (any N, any D), a miss (idx < 0) writing zeros. Indices are loaded once
per row block and reused across the column blocks of that program's tile.

Triton is imported when this module is imported (never at package import time); the
dispatcher in ops/gather/__init__.py imports it only when the fast path is used."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_kernel(table_ptr, idx_ptr, out_ptr, N, D, stride_t, stride_o,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                   # (BLOCK_N,)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)                   # (BLOCK_D,)
    rmask = rows < N
    idx = tl.load(idx_ptr + rows, mask=rmask, other=-1)              # (BLOCK_N,) int64
    hit = idx >= 0
    src = table_ptr + tl.where(hit, idx, 0)[:, None] * stride_t + cols[None, :]
    m = (rmask & hit)[:, None] & (cols[None, :] < D)
    vals = tl.load(src, mask=m, other=0.0)                           # (BLOCK_N, BLOCK_D)
    dst = out_ptr + rows[:, None] * stride_o + cols[None, :]
    tl.store(dst, vals, mask=rmask[:, None] & (cols[None, :] < D))


def gather_rows_triton(table: Tensor, idx: Tensor) -> Tensor:
    """table (R, D) with unit column stride, idx (N,) int64 -> (N, D)."""
    if table.stride(1) != 1:
        table = table.contiguous()
    idx = idx.contiguous().to(torch.int64)
    N, D = idx.shape[0], table.shape[1]
    out = torch.empty(N, D, dtype=table.dtype, device=table.device)
    if N == 0 or D == 0:
        return out
    BLOCK_N = 16
    BLOCK_D = min(128, triton.next_power_of_2(D))
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    _gather_kernel[grid](table, idx, out, N, D, table.stride(0), out.stride(0), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out
