"""Paged attention on plain PyTorch: batched gather through the block table, then SDPA.

The path that needs nothing but torch: the CPU fallback when the compiled kernel (cpu.py) is not
available, the path for inputs that need gradients, and the GPU fallback when Triton cannot take
a shape. Decode gathers the blocks of every sequence at once into a padded (B, kv_heads,
M*block_size, D) tensor (one copy, `gather_heads`) and runs SDPA with a validity mask, so it reads
each K/V byte twice and writes it once where contiguous SDPA reads it once. Without gradients the
gather lands in a per-thread workspace that is reused from call to call: a fresh buffer each call
cost page faults on first touch (36.7 ms vs 10.0 ms to gather 16 MB, docs/benchmarks/runtime.md);
`release_workspace()` frees it. GQA is folded into the query axis (ops/attention/sdpa.py), so
repeated KV heads are never materialised.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.ops.paged_attention.reference import prefill_mask

_ws = threading.local()
REUSE_WORKSPACE = True  # False: a fresh gather buffer per call, as before (benchmarks compare the two)


def workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of `numel` elements, reused by later calls on this thread with the same name
    (grown when too small). Its contents are whatever the last user left: write before reading."""
    bufs = _ws.__dict__.setdefault("bufs", {})
    key = (name, dtype, device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's gather workspaces."""
    _ws.__dict__.pop("bufs", None)


def gather_heads(cache: Tensor, ids: Tensor, name: str | None = None) -> Tensor:
    """The blocks `ids` (..., nb) of a (num_blocks, Hkv, bs, D) cache view, as (..., Hkv, nb*bs, D)
    in one copy: each (block, head) is a contiguous run of bs*D elements inside the pool
    (memory/kv/store.py), so the runs are picked straight from the pool's storage in head-major
    order -- no advanced indexing of a strided view (element by element) and no second transposing
    copy. With `name` the copy lands in that reusable workspace (see `workspace`). Falls back to
    indexing for other layouts and when gradients are needed (the storage view is outside autograd)."""
    n, h, bs, d = cache.shape
    run = bs * d
    s0, s1 = cache.stride(0), cache.stride(1)
    off = cache.storage_offset()
    if (cache.requires_grad and torch.is_grad_enabled()) or cache.stride()[2:] != (d, 1) or s0 % run or s1 % run \
            or off % run:
        k = cache[ids]                                                            # (..., nb, Hkv, bs, D)
        return k.movedim(-3, -4).reshape(*ids.shape[:-1], h, ids.shape[-1] * bs, d)
    total = cache.untyped_storage().nbytes() // cache.element_size() // run
    rows = cache.new_empty(0).set_(cache.untyped_storage(), 0, (total, run), (run, 1))  # the whole pool, as runs
    heads = torch.arange(h, device=cache.device) * (s1 // run)
    idx = (off // run + ids[..., None, :] * (s0 // run) + heads[:, None]).reshape(-1)  # (... * Hkv * nb,)
    if name is None:
        out = rows.index_select(0, idx)
    else:
        out = torch.index_select(rows, 0, idx, out=workspace(name, idx.numel() * run, cache.dtype,
                                                             cache.device).view(-1, run))
    return out.view(*ids.shape[:-1], h, ids.shape[-1] * bs, d)


def _reuse(*ts: Tensor) -> bool:
    return REUSE_WORKSPACE and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def gather_kv(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int,
              reuse: bool = False) -> tuple[Tensor, Tensor]:
    """Slots [start, end) of one sequence as (kv_heads, end - start, head_dim) K and V (views of
    the workspace when `reuse`: valid until the next gather on this thread)."""
    ids = block_table[:-(-end // k_cache.shape[2])].long()
    k = gather_heads(k_cache, ids, "k" if reuse else None)
    v = gather_heads(v_cache, ids, "v" if reuse else None)
    return k[:, start:end], v[:, start:end]


def paged_decode_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, starts: Tensor,
                       lens: Tensor, scale: float | None = None) -> Tensor:
    """Same contract as `paged_decode_ref`."""
    B, H, D = q.shape
    Hkv, bs = k_cache.shape[1], k_cache.shape[2]
    nb = int(-(-int(lens.max()) // bs))
    ids = block_tables[:, :nb].long().clamp_min(0)                               # (B, nb)
    reuse = _reuse(q, k_cache, v_cache)
    k = gather_heads(k_cache, ids, "k" if reuse else None)                       # (B, Hkv, S, D)
    v = gather_heads(v_cache, ids, "v" if reuse else None)
    slot = torch.arange(nb * bs, device=q.device)
    mask = (slot >= starts[:, None]) & (slot < lens[:, None])                    # (B, S)
    g = H // Hkv
    qg = q.reshape(B, Hkv, g, D)                                                 # heads h = kv*g + j
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None], scale=scale)
    return out.reshape(B, H, D)


def paged_prefill_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int, end: int,
                       scale: float | None = None) -> Tensor:
    """Same contract as `paged_prefill_ref`: gather the sequence's visible slots, then SDPA."""
    T, H, D = q.shape
    k, v = gather_kv(k_cache, v_cache, block_table, start, end, reuse=_reuse(q, k_cache, v_cache))  # (Hkv, S, D)
    Hkv, S = k.shape[0], k.shape[1]
    g = H // Hkv
    mask = prefill_mask(T, start, end, q.device)                                 # (T, S)
    qg = q.permute(1, 0, 2).reshape(Hkv, g * T, D)                               # heads h = kv*g + j, then tokens
    out = F.scaled_dot_product_attention(qg[None], k[None], v[None], attn_mask=mask.repeat(g, 1)[None, None],
                                         scale=scale if scale is not None else 1.0 / math.sqrt(D))
    return out[0].reshape(H, T, D).transpose(0, 1)                               # (T, H, D)


def paged_attention_varlen_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                 cu_seqlens: Tensor, starts: Tensor, ends: Tensor,
                                 scale: float | None = None) -> Tensor:
    """Same contract as `paged_attention_varlen_ref`: one gather + SDPA per sequence."""
    out = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    for s, (st, en) in enumerate(zip(starts.tolist(), ends.tolist())):
        if cu[s + 1] > cu[s]:
            out[cu[s]:cu[s + 1]] = paged_prefill_sdpa(q[cu[s]:cu[s + 1]], k_cache, v_cache, block_tables[s], st, en,
                                                      scale)
    return out
