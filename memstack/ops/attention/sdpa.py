"""Fast attention on PyTorch SDPA, grouped-query aware without repeating KV heads.

GQA/MQA: the G = n_heads / kv_heads query heads that share one KV head are folded into the
query-length axis, q (B,H,T,D) -> (B,Hkv,G*T,D), so SDPA reads each KV head once and nothing of
size (B,H,S,D) is ever built. The (B,T,S) mask is tiled G times along T to match (it is bool
and small next to K/V).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Same contract as `attention_ref`: q (B,H,T,D), k/v (B,Hkv,S,D), mask (B,T,S) bool or None (causal)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if mask is None and T != S:
        raise ValueError(f"causal attention without a mask needs T == S, got T={T}, S={S}")
    g = H // Hkv
    if g == 1:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None].expand(B, T, S)
    qg = q.reshape(B, Hkv, g * T, D)                                   # (B,Hkv,G*T,D): heads h = kv*G + j
    mg = mask.repeat(1, g, 1)[:, None]                                 # (B,1,G*T,S)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg)       # (B,Hkv,G*T,D)
    return out.reshape(B, H, T, D)
