"""Row gather, the plain reference: out[i] = table[idx[i]], and a zero row where idx[i] < 0
(a miss: an identity key that was never admitted, or a row that is not this rank's).

The gradient of the table is a *sparse* COO tensor holding one (row, grad) pair per valid
lookup (duplicates are summed when it is coalesced), so a training step never materialises a
dense gradient of a large table."""
from __future__ import annotations

import torch
from torch import Tensor


def gather_rows_ref(table: Tensor, idx: Tensor) -> Tensor:
    """table (R, D), idx (N,) int64 in [-1, R) -> (N, D); rows with idx < 0 are zero."""
    valid = idx >= 0                                                  # (N,)
    rows = table[idx.clamp(min=0)]                                    # (N, D)
    return torch.where(valid[:, None], rows, torch.zeros((), dtype=table.dtype, device=table.device))


def sparse_row_grad(grad_out: Tensor, idx: Tensor, shape: torch.Size, device: torch.device | None = None) -> Tensor:
    """The table's gradient as an uncoalesced sparse COO tensor: grad_out (N, D) at rows idx (N,);
    misses (idx < 0) contribute nothing."""
    valid = idx >= 0
    rows, vals = idx[valid], grad_out[valid]                          # (M,), (M, D)
    device = device or grad_out.device
    return torch.sparse_coo_tensor(rows[None].to(device), vals.to(device), shape, device=device, check_invariants=False)
