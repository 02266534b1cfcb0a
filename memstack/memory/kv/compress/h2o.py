"""H2O heavy hitters (Zhang et al., arXiv 2306.14048): a token's score is the attention it has
received so far, summed over queries (and over the query heads sharing its KV head); the cache
keeps the recent tokens plus the highest-scoring ones.

Deviation: eviction happens at segment ends down to the budget (the paper evicts one token per
decoding step to a fixed size); the scores are computed by a separate plain-torch pass over the
held keys, since fused attention kernels do not return probabilities.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_received(q: Tensor, k: Tensor, valid: Tensor, causal_tail: int) -> Tensor:
    """Attention mass each key receives from the queries, summed over queries and the query
    heads of its group. q (B, H, T, D), k (B, Hkv, S, D) with the queries' own keys as the last
    `causal_tail` (= T) entries; valid (B, S - T) for the past. Returns (B, Hkv, S) fp32."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    s = torch.einsum("bkgtd,bksd->bkgts", q.float().reshape(B, Hkv, g, T, D), k.float()) / math.sqrt(D)
    past = S - causal_tail
    mask = torch.ones(B, T, S, dtype=torch.bool, device=q.device)
    mask[:, :, :past] = valid[:, None, :]
    mask[:, :, past:] = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~mask[:, None, None], float("-inf"))
    return torch.softmax(s, -1).sum((2, 3))                                       # (B, Hkv, S)
