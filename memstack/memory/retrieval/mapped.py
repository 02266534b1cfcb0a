"""Memory-mapped (key, value) storage for Memorizing Transformer's per-document memory.

The paper keeps up to 65k-262k (key, value) pairs per document (arXiv 2203.08913, section 3);
lucidrains' port keeps them in numpy memmaps. `MemorizingConfig(store="mmap")` does the same:
each kNN layer's keys and values are one (B, Hkv, mem_len, hd) array in a memory-mapped file,
preallocated, written in place -- the pages the OS does not need stay on disk, so the resident
size of a row's memory is what the reads touch, not mem_len x bytes per entry. The validity mask
and the stamps (B, mem_len) stay in RAM.

Exactness: the in-memory store keeps, at each segment end, the mem_len entries with the newest
stamps among (held, pending) (`MemorizingTransformer._merge`, by concatenation); `merge_in_place`
keeps exactly the same set, writing each incoming entry into a slot that drops out. The read
(top-k of q.k, softmax over the k kept) does not depend on slot order, so both stores give the same
output (tests/memory/retrieval/test_memorizing_mmap.py; FIFO only -- LRU breaks stamp ties by
slot order, so the config refuses `store="mmap"` with `evict="lru"`).

The files are created in `mmap_dir` (default: the system temp dir) and unlinked at once: the
mapping keeps them alive, and nothing is left behind by a crash. Persisting a state goes through
`memory/state.py`'s `save_state` (safetensors + SHA-256, atomic) like every state.

Writing in place means a state object is consumed by the call that takes it: a call that would
read a state after a later call wrote to the same files raises instead of reading the new
entries (`live` counter vs the state's `gen`).
"""
from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import Tensor

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.float64: np.float64}


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype, directory: str = "") -> Tensor:
    """A zero tensor backed by a fresh memory-mapped file (unlinked: the mapping keeps it alive)."""
    if dtype not in _NP:
        raise ValueError(f"no memory-mapped storage for dtype {dtype}; use float32, float16 or bfloat16")
    with tempfile.NamedTemporaryFile(dir=directory or None, prefix="memstack-memorizing-", suffix=".bin") as f:
        arr = np.memmap(f, dtype=_NP[dtype], mode="w+", shape=tuple(shape))     # zero-filled, sparse on disk
    t = torch.from_numpy(arr)
    return t.view(dtype) if t.dtype != dtype else t


def merge_in_place(mk: Tensor, mv: Tensor, valid: Tensor, stamp: Tensor, pk: Tensor, pv: Tensor, ppos: Tensor,
                   pvalid: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the C newest-stamped entries of (held C slots, pending P): mk, mv (B, Hkv, C, hd) are
    written in place (incoming entries into the slots that drop out); returns the new valid and
    stamp (B, C). Priority and tie-breaking are `_merge`'s: invalid entries last, later wins."""
    B, _, C, _ = mk.shape
    P = pk.shape[2]
    if P == 0:
        return valid, stamp
    prio = torch.cat([torch.where(valid, stamp, torch.full_like(stamp, -1)),
                      torch.where(pvalid, ppos, torch.full_like(ppos, -1))], 1)  # (B, C + P)
    order = torch.arange(C + P, device=mk.device)
    keep = (prio * (C + P + 1) + order).topk(C, dim=1).indices                 # (B, C)
    kept = torch.zeros(B, C + P, dtype=torch.bool, device=mk.device).scatter(1, keep, True)
    fr, fs = (~kept[:, :C]).nonzero(as_tuple=True)                             # slots that drop out, row-major
    nr, npend = kept[:, C:].nonzero(as_tuple=True)                             # incoming entries kept, row-major
    # per row, as many incoming entries are kept as held slots drop out: pair them in order
    mk[fr, :, fs] = pk[nr, :, npend].to(mk.dtype)                              # (N, Hkv, hd)
    mv[fr, :, fs] = pv[nr, :, npend].to(mv.dtype)
    valid, stamp = valid.clone(), stamp.clone()
    valid[fr, fs] = pvalid[nr, npend]
    stamp[fr, fs] = ppos[nr, npend]
    return valid, stamp


def read_gathered(q: Tensor, mk: Tensor, mv: Tensor, idx: Tensor) -> Tensor:
    """Attention of q (B, H, T, D) over the memory entries `idx` (B, H, T, k) (-1: none) that
    `topk_attention` selected, recomputed from those rows alone: autograd then saves copies of the
    k rows, never the mapped arrays (which a later segment end overwrites in place). GQA: head h
    reads KV head h // (H / Hkv). Rows with no entry give 0."""
    B, H, T, D = q.shape
    Hkv, C = mk.shape[1], mk.shape[2]
    k = idx.shape[-1]
    kvh = torch.arange(H, device=q.device) // (H // Hkv)
    base = (torch.arange(B, device=q.device)[:, None] * Hkv + kvh[None]) * C    # (B, H)
    flat = (base[:, :, None, None] + idx.clamp(min=0)).reshape(-1)              # (B*H*T*k,)
    keys = mk.reshape(-1, D)[flat].reshape(B, H, T, k, D).to(q.dtype)
    vals = mv.reshape(-1, D)[flat].reshape(B, H, T, k, D).to(q.dtype)
    s = (q[..., None, :] * keys).sum(-1) / D ** 0.5                              # (B, H, T, k)
    none = idx < 0
    w = torch.softmax(s.masked_fill(none, float("-inf")), -1)
    w = torch.where(none, torch.zeros_like(w), w)                                # all-none rows: NaN -> 0
    return (w[..., None] * vals).sum(-2)
