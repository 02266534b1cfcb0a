"""Reference attention: plain fp32 softmax attention with the KV heads repeated explicitly.

The ground truth the fast path is tested against. Obvious, not fast.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q (B,H,T,D), k/v (B,Hkv,S,D), mask (B,T,S) bool (True = may attend) or None = causal (T == S).

    Returns (B,H,T,D) in q's dtype, computed in fp32.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"n_heads ({H}) must be a multiple of kv heads ({Hkv})")
    g = H // Hkv
    qf, kf, vf = q.float(), k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(D)                 # (B,H,T,S)
    if mask is None:
        if T != S:
            raise ValueError(f"causal attention without a mask needs T == S, got T={T}, S={S}")
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)                             # (B,H,T,S)
    return (probs @ vf).to(q.dtype)
