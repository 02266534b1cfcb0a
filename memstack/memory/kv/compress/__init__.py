"""KV compression on paged blocks: score the held slots, keep the best, compact into fresh blocks.

Every token policy is a scorer (one file each) plus the shared selection below: the most recent
`recent` slots (and, for StreamingLLM, the sinks) are always kept, invalid slots (reset rows)
never win against valid ones, and each (layer, KV head) keeps its own top-k. The paged cache then
gathers the kept slots into new blocks and frees the old ones whole -- memory is released, not
masked (kvpress masks pruned keys with "fake" keys; kv-runtime-memory.md, section 5).

    streaming  StreamingLLM (arXiv 2309.17453): sinks + the most recent tokens
    h2o        H2O (arXiv 2306.14048): accumulated attention ("heavy hitters") + recent
    snapkv     SnapKV (arXiv 2404.14469): attention of the observation window, pooled, + window
    kivi       KIVI (arXiv 2402.02750): not a selection -- blocks older than the residual window
               are stored as 2/4-bit codes (kivi.py)
"""
from __future__ import annotations

import torch
from torch import Tensor


def keep_indices(scores: Tensor, valid: Tensor, k: int, recent: int, sinks: int = 0) -> Tensor:
    """scores (B, L, Hkv, S), valid (B, S) -> kept slot indices (B, L, Hkv, k): valid slots first
    in ascending slot order, then (only if fewer than k are valid) invalid ones."""
    B, L, H, S = scores.shape
    k = min(k, S)
    sc = scores.float().clone()
    slot = torch.arange(S, device=scores.device)
    forced = (slot >= S - recent) | (slot < sinks)                               # (S,)
    sc = sc.masked_fill(forced, float("inf"))
    sc = sc.masked_fill(~valid[:, None, None, :], float("-inf"))
    idx = sc.topk(k, dim=-1).indices                                             # (B, L, Hkv, k)
    inval = ~valid[:, None, None, :].expand(B, L, H, S).gather(-1, idx)
    order = (idx + S * inval).argsort(-1)                                        # valid first, ascending
    return idx.gather(-1, order)


def budget(seen: int, keep_ratio: float) -> int:
    """Tokens kept after `seen` tokens at this keep ratio."""
    import math

    return max(1, math.ceil(keep_ratio * seen - 1e-9))
