"""Token presses on the engine's shared pool: score each held slot of a request, keep the best of
every (layer, KV head), compact them into the request's first blocks and free the others.

The engine's pool holds a request's K/V in blocks of all layers and KV heads. A token press
decides per (layer, KV head) (as kvpress and `kv_paged` do): the kept slots of each (layer, head)
are gathered into slots [0, k) of the same blocks -- different tokens per head, which attention
does not mind: keys are stored after RoPE, so a slot's position is baked into its key, and every
kept slot precedes every later query. The blocks after ceil(k / block_size) go back to the pool
(`KVCacheManager.truncate`): its free count rises by exactly that many.

This runs on the K/V at rest, after a step, for any stateless model (no memory family is named):
the engine calls it at a request's segment ends, where `kv_paged` compresses, with the same
budget (keep_ratio of the tokens seen) and the same selection (`keep_indices`), so a request
served with a press produces the tokens of `memstack.generate` with `kv_paged` compressing the
same way (tests/engine/test_press.py).

`compact` is the fast path (one gather and one scatter); `compact_reference` does the same one
(layer, head, slot) at a time, for the tests.
"""
from __future__ import annotations

import torch
from torch import Tensor

from memstack.memory.kv.compress import keep_indices
from memstack.memory.kv.store import PagedKVCache


def held(cache: PagedKVCache, block_ids: list[int], start: int, n_slots: int) -> Tensor:
    """The request's held slots [start, n_slots) as (L, 2, Hkv, S, hd)."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=cache.device)
    x = cache.kv[ids]                                                            # (NB, L, 2, Hkv, bs, hd)
    NB, L, _, H, bs, hd = x.shape
    return x.permute(1, 2, 3, 0, 4, 5).reshape(L, 2, H, NB * bs, hd)[:, :, :, start:n_slots]


def compact(cache: PagedKVCache, block_ids: list[int], start: int, n_slots: int, scores: Tensor, k: int,
            recent: int, sinks: int) -> int:
    """Keep the top-k slots of each (layer, KV head) (scores (L, Hkv, S) over slots [start,
    n_slots); the last `recent` and first `sinks` forced), written in slot order into slots [0, k)
    of the request's first ceil(k / bs) blocks. Returns that number of blocks."""
    x = held(cache, block_ids, start, n_slots)                                   # (L, 2, Hkv, S, hd)
    L, _, H, S, hd = x.shape
    bs = cache.spec.block_size
    idx = keep_indices(scores[None], torch.ones(1, S, dtype=torch.bool, device=x.device), k, recent, sinks)[0]
    kept = x.gather(3, idx[:, None, :, :, None].expand(L, 2, H, k, hd))          # (L, 2, Hkv, k, hd)
    nbk = -(-k // bs)
    kept = torch.cat([kept, kept.new_zeros(L, 2, H, nbk * bs - k, hd)], 3)
    blocks = kept.reshape(L, 2, H, nbk, bs, hd).permute(3, 0, 1, 2, 4, 5)        # (nbk, L, 2, Hkv, bs, hd)
    cache.kv[torch.tensor(block_ids[:nbk], dtype=torch.long, device=cache.device)] = blocks
    return nbk


def select_reference(scores: Tensor, k: int, recent: int, sinks: int) -> list[list[list[int]]]:
    """Kept slots per (layer, head), ascending: the forced ones (first `sinks`, last `recent`),
    then the highest scores (ties: lower slot first) until k."""
    L, H, S = scores.shape
    out = []
    for l in range(L):
        row = []
        for h in range(H):
            forced = [s for s in range(S) if s < sinks or s >= S - recent]
            rest = sorted((s for s in range(S) if s not in forced), key=lambda s: (-float(scores[l, h, s]), s))
            row.append(sorted((forced + rest)[:k]))
        out.append(row)
    return out


def compact_reference(cache: PagedKVCache, block_ids: list[int], start: int, n_slots: int, scores: Tensor, k: int,
                      recent: int, sinks: int) -> int:
    """`compact`, one (layer, head, slot) at a time through the block table."""
    bs = cache.spec.block_size
    sel = select_reference(scores, k, recent, sinks)
    src = held(cache, block_ids, start, n_slots).clone()
    for l, row in enumerate(sel):
        for h, slots in enumerate(row):
            for j, s in enumerate(slots):
                b, o = block_ids[j // bs], j % bs
                cache.kv[b, l, 0, h, o] = src[l, 0, h, s]
                cache.kv[b, l, 1, h, o] = src[l, 1, h, s]
    return -(-k // bs)
