"""Reference nearest-neighbour ops: obvious, fp32/fp64, no streaming. The ground truth the fast
paths (ops/knn/torch_fast.py) are tested against.

Scores are "higher is closer": metric "ip" scores q.k, metric "l2" scores -||q - k||^2 (the
kNN-LM convention: p_kNN uses exp of the negative squared distance).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = float("-inf")


def pair_scores_ref(q: Tensor, keys: Tensor, metric: str) -> Tensor:
    """q (Q, d), keys (N, d) -> scores (Q, N) in fp64, computed the obvious way."""
    qf, kf = q.double(), keys.double()
    if metric == "ip":
        return qf @ kf.T
    if metric == "l2":
        return -((qf[:, None, :] - kf[None, :, :]) ** 2).sum(-1)
    raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")


def knn_search_ref(q: Tensor, keys: Tensor, k: int, metric: str, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k of every query over all keys.

    q (Q, d), keys (N, d), valid (N,) or (Q, N) bool (None: all). Returns scores (Q, k) fp32,
    descending, and indices (Q, k) int64 into keys; slots beyond the valid count hold
    (-inf, -1).
    """
    Q, N = q.shape[0], keys.shape[0]
    scores = pair_scores_ref(q, keys, metric)                           # (Q, N)
    if valid is not None:
        scores = scores.masked_fill(~valid.expand(Q, N), NEG_INF)
    out_s = torch.full((Q, k), NEG_INF, dtype=torch.float32, device=q.device)
    out_i = torch.full((Q, k), -1, dtype=torch.long, device=q.device)
    kk = min(k, N)
    if kk:
        s, i = scores.topk(kk, dim=1)
        keep = s > NEG_INF
        out_s[:, :kk] = torch.where(keep, s, NEG_INF).float()
        out_i[:, :kk] = torch.where(keep, i, -1)
    return out_s, out_i


def topk_attention_ref(q: Tensor, mk: Tensor, mv: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of every query over its top-k memory entries, one query at a time.

    q (B, H, T, D); mk, mv (B, Hkv, C, D) (query head h reads kv head h // (H / Hkv)); valid (B, C).
    For each query: scores s_c = q.k_c / sqrt(D) over valid c, keep the k largest, softmax over
    them, sum of their values. Returns (out (B, H, T, D), has (B, H, T) bool = at least one
    valid entry, idx (B, H, T, k) int64 chosen entries, -1 where none).
    """
    B, H, T, D = q.shape
    Hkv, C = mk.shape[1], mk.shape[2]
    g = H // Hkv
    out = torch.zeros(B, H, T, D, dtype=torch.float64, device=q.device)
    has = torch.zeros(B, H, T, dtype=torch.bool, device=q.device)
    idx = torch.full((B, H, T, k), -1, dtype=torch.long, device=q.device)
    for b in range(B):
        cand = valid[b].nonzero().flatten().tolist()
        for h in range(H):
            kv = h // g
            for t in range(T):
                if not cand:
                    continue
                s = [(float(q[b, h, t].double() @ mk[b, kv, c].double()) / math.sqrt(D), c) for c in cand]
                s.sort(key=lambda x: -x[0])
                top = s[:k]
                w = torch.softmax(torch.tensor([x[0] for x in top], dtype=torch.float64), 0)
                for j, (_, c) in enumerate(top):
                    out[b, h, t] += w[j] * mv[b, kv, c].double()
                    idx[b, h, t, j] = c
                has[b, h, t] = True
    return out.to(q.dtype), has, idx


def topk_attention_diff_ref(q: Tensor, mk: Tensor, mv: Tensor, valid: Tensor, k: int) -> Tensor:
    """Differentiable (in q) reference of topk_attention's output, with the entry selection of
    `topk_attention_ref`: used to check the fast path's gradient."""
    B, H, T, D = q.shape
    g = H // mk.shape[1]
    _, has, idx = topk_attention_ref(q.detach(), mk, mv, valid, k)
    kr = mk.repeat_interleave(g, dim=1).double()                        # (B, H, C, D)
    vr = mv.repeat_interleave(g, dim=1).double()
    sel = idx.clamp(min=0)                                               # (B, H, T, k)
    ks = torch.gather(kr[:, :, None].expand(B, H, T, -1, D), 3, sel[..., None].expand(-1, -1, -1, -1, D))
    vs = torch.gather(vr[:, :, None].expand(B, H, T, -1, D), 3, sel[..., None].expand(-1, -1, -1, -1, D))
    s = (q.double()[..., None, :] * ks).sum(-1) / math.sqrt(D)          # (B, H, T, k)
    s = s.masked_fill(idx < 0, NEG_INF)
    w = torch.softmax(s, -1).nan_to_num(0.0)
    out = (w[..., None] * vs).sum(-2)
    return torch.where(has[..., None], out, torch.zeros_like(out)).to(q.dtype)
