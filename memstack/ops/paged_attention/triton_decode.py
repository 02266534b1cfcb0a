"""Paged decode attention in Triton: one query token per sequence, K/V read in place through the
block table, GQA-native, split along the sequence (Flash-Decoding).

Grid (batch, kv_heads, splits). A program owns one KV head, so each K/V block is read once for
all G query heads that share it: the G heads are the rows of a (G_PAD, D) query tile and the
scores of a block are one tensor-core product (the FlashInfer trick for GQA decode). Each
program walks its share of the sequence's blocks with an online softmax and writes a partial
(max, sum, acc); a small torch step merges the splits (log-sum-exp). Slots outside
[start, len) are masked, so a sequence may start mid-block (window, segment scope).

Constraints (the dispatcher falls back to the torch path otherwise): block_size a power of two
>= 16 (the tile's key axis); head_dim and G are padded to powers of two >= 16 with masks.
Imported lazily: triton loads only when this path runs.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, start_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
    scale, n_blocks_per_split,
    s_qb, s_qh, s_qd,
    s_kn, s_kh, s_kt, s_kd,
    s_vn, s_vh, s_vt, s_vd,
    s_btb, s_btm,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    N_SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    start = tl.load(start_ptr + b)
    end = tl.load(len_ptr + b)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, BS)
    gmask = offs_g < G
    dmask = offs_d < D
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=gmask[:, None] & dmask[None, :], other=0.0)                 # (G_PAD, D_PAD)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    first = start // BS
    last = (end + BS - 1) // BS                                                  # exclusive
    j0 = first + sp * n_blocks_per_split
    j1 = tl.minimum(j0 + n_blocks_per_split, last)
    for j in range(j0, j1):
        page = tl.load(bt_ptr + b * s_btb + j * s_btm).to(tl.int64)
        slot = j * BS + offs_t
        tmask = (slot >= start) & (slot < end)
        k = tl.load(k_ptr + page * s_kn + h * s_kh + offs_t[:, None] * s_kt + offs_d[None, :] * s_kd,
                    mask=tmask[:, None] & dmask[None, :], other=0.0)             # (BS, D_PAD)
        v = tl.load(v_ptr + page * s_vn + h * s_vh + offs_t[:, None] * s_vt + offs_d[None, :] * s_vd,
                    mask=tmask[:, None] & dmask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale          # (G_PAD, BS)
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    base = (b * tl.num_programs(1) + h) * N_SPLITS + sp
    tl.store(m_ptr + base * G_PAD + offs_g, m_i)
    tl.store(l_ptr + base * G_PAD + offs_g, l_i)
    tl.store(acc_ptr + (base * G_PAD + offs_g)[:, None] * D_PAD + offs_d[None, :], acc)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def supports(q: Tensor, k_cache: Tensor) -> list[str]:
    """Reasons this kernel cannot take these inputs (empty: it can)."""
    r = []
    bs = k_cache.shape[2]
    if bs < 16 or bs & (bs - 1):
        r.append(f"block_size {bs} is not a power of two >= 16")
    if q.shape[1] % k_cache.shape[1]:
        r.append(f"query heads {q.shape[1]} not a multiple of kv heads {k_cache.shape[1]}")
    return r


def paged_decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, starts: Tensor,
                        lens: Tensor, scale: float | None = None, n_splits: int | None = None) -> Tensor:
    """Same contract as `paged_decode_ref`."""
    reasons = supports(q, k_cache)
    if reasons:
        raise ValueError("paged_decode_triton: " + "; ".join(reasons))
    B, H, D = q.shape
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    G_PAD, D_PAD = _pow2(G), _pow2(D)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    max_blocks = int(-(-int(lens.max()) // bs)) if B else 0
    if n_splits is None:  # enough programs to fill a GPU at small batch; one split at large batch
        n_splits = max(1, min(max_blocks, 128 // max(B * Hkv, 1)))
    per_split = max(1, -(-max_blocks // n_splits))
    dev = q.device
    m = torch.empty(B, Hkv, n_splits, G_PAD, device=dev, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hkv, n_splits, G_PAD, D_PAD, device=dev, dtype=torch.float32)
    bt = block_tables.to(torch.int32)
    _paged_decode_kernel[(B, Hkv, n_splits)](
        q, k_cache, v_cache, bt, starts.to(torch.int32), lens.to(torch.int32), m, l, acc,
        scale, per_split,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *bt.stride(),
        G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, BS=bs, N_SPLITS=n_splits, IEEE=q.dtype == torch.float32,
    )
    # merge the splits: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
    M = m.amax(2, keepdim=True)                                                   # (B, Hkv, 1, G_PAD)
    w = torch.exp(m - M).nan_to_num(0.0)                                          # empty splits: m = -inf
    out = (acc * w[..., None]).sum(2) / (l * w).sum(2)[..., None]                 # (B, Hkv, G_PAD, D_PAD)
    return out[:, :, :G, :D].reshape(B, H, D).to(q.dtype)
