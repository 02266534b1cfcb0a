"""SnapKV (Li et al., arXiv 2404.14469): the last `recent` queries of the prompt (the
observation window) vote for the keys they attend to; votes are summed over the window and the
query heads of a group, smoothed by 1-D average pooling (kernel `pool_kernel`) so neighbouring
tokens survive together, and the top keys are kept together with the window itself.

Deviation: compression runs at every segment end (the paper compresses the prompt once before
generation); the observation window is the last `recent` queries of the segment just read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def snap_scores(q: Tensor, k: Tensor, valid: Tensor, window: int, kernel: int) -> Tensor:
    """q (B, H, T, D) of the chunk; k (B, Hkv, S, D) = past keys then the chunk's T keys;
    valid (B, S - T) for the past. Returns pooled votes (B, Hkv, S) of the last min(window, T)
    queries (query i of the window sits at chunk index T - w + i and sees causally)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    w, g, past = min(window, T), H // Hkv, S - T
    qw = q[:, :, T - w:].float().reshape(B, Hkv, g, w, D)
    s = torch.einsum("bkgtd,bksd->bkgts", qw, k.float()) / math.sqrt(D)          # (B, Hkv, g, w, S)
    mask = torch.ones(B, w, S, dtype=torch.bool, device=k.device)
    mask[:, :, :past] = valid[:, None, :]
    mask[:, :, past:] = torch.arange(T, device=k.device)[None, :] <= torch.arange(T - w, T, device=k.device)[:, None]
    votes = torch.softmax(s.masked_fill(~mask[:, None, None], float("-inf")), -1).sum((2, 3))   # (B, Hkv, S)
    pooled = F.avg_pool1d(votes.reshape(-1, 1, S), kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled.reshape(B, Hkv, S)
