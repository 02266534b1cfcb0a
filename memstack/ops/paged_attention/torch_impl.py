"""Paged attention on plain PyTorch: batched gather through the block table, then SDPA.

The CPU fast path (and the GPU fallback when Triton cannot take a shape). Decode gathers the
blocks of every sequence at once into a padded (B, kv_heads, M*block_size, D) tensor (one copy,
`gather_heads`) -- the "Python paged gather" that the reference note measured at ~14% of HBM
bandwidth on an H100;
on a GPU the Triton kernel reads the blocks in place instead. GQA is folded into the query axis
(ops/attention/sdpa.py), so repeated KV heads are never materialised.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.ops.attention.sdpa import attention_sdpa
from memstack.ops.paged_attention.reference import prefill_mask


def gather_heads(cache: Tensor, ids: Tensor) -> Tensor:
    """The blocks `ids` (..., nb) of a (num_blocks, Hkv, bs, D) cache view, as (..., Hkv, nb*bs, D)
    in one copy: each (block, head) is a contiguous run of bs*D elements inside the pool
    (memory/kv/store.py), so the runs are picked straight from the pool's storage in head-major
    order -- no advanced indexing of a strided view (element by element) and no second transposing
    copy. Falls back to indexing for other layouts and when gradients are needed (the storage
    view is outside autograd)."""
    n, h, bs, d = cache.shape
    run = bs * d
    s0, s1 = cache.stride(0), cache.stride(1)
    off = cache.storage_offset()
    if cache.requires_grad or cache.stride()[2:] != (d, 1) or s0 % run or s1 % run or off % run:
        k = cache[ids]                                                            # (..., nb, Hkv, bs, D)
        return k.movedim(-3, -4).reshape(*ids.shape[:-1], h, ids.shape[-1] * bs, d)
    total = cache.untyped_storage().nbytes() // cache.element_size() // run
    rows = cache.new_empty(0).set_(cache.untyped_storage(), 0, (total, run), (run, 1))  # the whole pool, as runs
    heads = torch.arange(h, device=cache.device) * (s1 // run)
    idx = off // run + ids[..., None, :] * (s0 // run) + heads[:, None]          # (..., Hkv, nb)
    return rows.index_select(0, idx.reshape(-1)).view(*ids.shape[:-1], h, ids.shape[-1] * bs, d)


def gather_kv(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """Slots [start, end) of one sequence as (kv_heads, end - start, head_dim) K and V."""
    ids = block_table[:-(-end // k_cache.shape[2])].long()
    return gather_heads(k_cache, ids)[:, start:end], gather_heads(v_cache, ids)[:, start:end]


def paged_decode_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, starts: Tensor,
                       lens: Tensor, scale: float | None = None) -> Tensor:
    """Same contract as `paged_decode_ref`."""
    B, H, D = q.shape
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    nb = int(-(-int(lens.max()) // bs))
    ids = block_tables[:, :nb].long().clamp_min(0)                               # (B, nb)
    k = gather_heads(k_cache, ids)                                               # (B, Hkv, S, D)
    v = gather_heads(v_cache, ids)
    slot = torch.arange(nb * bs, device=q.device)
    mask = (slot >= starts[:, None]) & (slot < lens[:, None])                    # (B, S)
    g = H // Hkv
    qg = q.reshape(B, Hkv, g, D)                                                 # heads h = kv*g + j
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None], scale=scale)
    return out.reshape(B, H, D)


def paged_prefill_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int,
                       scale: float | None = None) -> Tensor:
    """Same contract as `paged_prefill_ref`: gather the sequence's visible slots, then SDPA."""
    if scale is not None and abs(scale - 1.0 / math.sqrt(q.shape[-1])) > 1e-12:
        raise ValueError("paged_prefill_sdpa uses the default 1/sqrt(head_dim) scale")
    k, v = gather_kv(k_cache, v_cache, block_table, start, end)                  # (Hkv, S, D)
    mask = prefill_mask(q.shape[0], start, end, q.device)                        # (T, S)
    out = attention_sdpa(q.transpose(0, 1)[None], k[None], v[None], mask[None])   # (1, H, T, D)
    return out[0].transpose(0, 1)
