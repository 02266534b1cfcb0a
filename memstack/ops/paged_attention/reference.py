"""Reference paged attention: gather K/V through the block table, then plain fp32 attention.

The ground truth the fast paths are tested against (and what vLLM's kernel tests compare with:
`ref_single_query_cached_kv_attention` gathers through the block table with a loop).

Cache layout (memory/kv/store.py): k_cache, v_cache (num_blocks, kv_heads, block_size, head_dim),
possibly strided views of one pool. A sequence's visible keys are the slots [start, end) of the
concatenation of its blocks (block_table[0], block_table[1], ...).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def gather_kv(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """Slots [start, end) of one sequence as contiguous (kv_heads, end - start, head_dim) K and V."""
    bs = k_cache.shape[2]
    nb = -(-end // bs)
    ids = block_table[:nb].long()
    k = k_cache[ids].transpose(0, 1).reshape(k_cache.shape[1], nb * bs, -1)   # (Hkv, nb*bs, D)
    v = v_cache[ids].transpose(0, 1).reshape(v_cache.shape[1], nb * bs, -1)
    return k[:, start:end], v[:, start:end]


def _attend_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """q (H, T, D), k/v (Hkv, S, D), mask (T, S) bool or None -> (H, T, D) fp32, KV heads repeated."""
    g = q.shape[0] // k.shape[0]
    kf, vf = k.float().repeat_interleave(g, 0), v.float().repeat_interleave(g, 0)
    s = q.float() @ kf.transpose(-1, -2) * scale                                  # (H, T, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ vf


def paged_decode_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, starts: Tensor,
                     lens: Tensor, scale: float | None = None) -> Tensor:
    """One query per sequence. q (B, H, D); block_tables (B, M); starts, lens (B,): sequence b
    attends to its slots [starts[b], lens[b]). Returns (B, H, D) in q's dtype."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = []
    for b in range(q.shape[0]):
        k, v = gather_kv(k_cache, v_cache, block_tables[b], int(starts[b]), int(lens[b]))
        out.append(_attend_ref(q[b][:, None], k, v, None, scale)[:, 0])
    return torch.stack(out).to(q.dtype)


def prefill_mask(n_q: int, start: int, end: int, device: torch.device) -> Tensor:
    """(n_q, end - start) bool: the n_q queries hold the last n_q slots of [start, end); query i
    sees slots up to and including its own (causal)."""
    q_slot = torch.arange(end - n_q, end, device=device)[:, None]                # (T, 1)
    k_slot = torch.arange(start, end, device=device)[None]                       # (1, S)
    return k_slot <= q_slot


def paged_prefill_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int,
                      scale: float | None = None) -> Tensor:
    """A chunk of T queries of one sequence, whose K/V are already written at slots [end - T, end).
    q (T, H, D) -> (T, H, D); query i attends to slots [start, end - T + i]."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k, v = gather_kv(k_cache, v_cache, block_table, start, end)
    mask = prefill_mask(q.shape[0], start, end, q.device)
    return _attend_ref(q.transpose(0, 1), k, v, mask, scale).transpose(0, 1).to(q.dtype)


def paged_attention_varlen_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens: Tensor,
                               starts: Tensor, ends: Tensor, scale: float | None = None) -> Tensor:
    """Many sequences' queries packed: q (N, H, D); sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1]
    (n_s of them, its last n_s slots, already written) and sees slots [starts[s], ends[s]) of
    block_tables[s], causally (its query j sees up to slot ends[s] - n_s + j). A decode row is a
    sequence of one query; a prefill chunk is one sequence. Returns (N, H, D) in q's dtype."""
    out = q.new_zeros(q.shape)
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        if cu[s + 1] > cu[s]:
            out[cu[s]:cu[s + 1]] = paged_prefill_ref(q[cu[s]:cu[s + 1]], k_cache, v_cache, block_tables[s],
                                                     int(starts[s]), int(ends[s]), scale)
    return out
