"""Memorizing Transformer kNN-augmented attention (Wu et al., arXiv 2203.08913).

What it stores: for each kNN layer, the (key, value) pairs of the document's past tokens, per
KV head, up to `mem_len` of them (non-differentiable: stop-gradient), with a timestamp per slot.
Read (ATTN site, `attn_out`): every query of the layer retrieves its top-k memory keys by
q.k / sqrt(d) and attends over them (softmax over the k kept) -> V_m; local attention over the
segment gives V_c; a learned per-head gate mixes them: V = g V_m + (1 - g) V_c, g = sigmoid(b_g).
Write: the segment's keys/values join the memory when the segment ends (so no position ever
retrieves keys of its own segment, which local attention already covers causally). When the
memory is full it evicts by policy -- "fifo" (oldest first) or "lru" (least recently retrieved)
-- instead of being reset as in the popular port (lucidrains/memorizing-transformers-pytorch).

Where the "one datastore" goes here: this memory is per document and per batch row and lives
inside the forward pass, so it is kept in the explicit model state (saved, reset and batched
like every state) and searched with the datastore's exact-search kernel family (ops/knn, GQA
folded, one batched matmul + top-k for all heads and queries, on the model's device). A FAISS
index per row would bring back exactly what makes the popular port >10x slower: a CPU round
trip per step (lucidrains #1), and FAISS cannot evict from HNSW.

Deviations from the paper:
- retrieved memories carry no position information: keys and queries are un-rotated (inverse
  RoPE) for the memory read, as the paper gives retrieved memories no position bias;
- no key/query normalisation (our backbone has no QK-norm; the paper normalises against
  staleness); exact top-k instead of approximate (the paper finds ~90% recall as good);
- with GQA, one memory per KV head (the paper is multi-head: one per head);
- the paper pairs memory with a Transformer-XL cache: stack `xl` with this memory for that.

`store="mmap"` keeps the keys/values in preallocated memory-mapped files written in place (the
paper's 65k+ entries per document; memory/retrieval/mapped.py), with the same read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from memstack.backbone.layers import rope_tables
from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext, dtype_bytes, segment_so_far
from memstack.memory.retrieval.config import MemorizingConfig
from memstack.ops.knn import topk_attention


@dataclass
class MemorizingState:
    mk: tuple[Tensor, ...]      # per kNN layer (B, Hkv, M, hd) un-rotated keys, detached
    mv: tuple[Tensor, ...]      # per kNN layer (B, Hkv, M, hd) values, detached
    valid: tuple[Tensor, ...]   # per kNN layer (B, M) bool
    stamp: tuple[Tensor, ...]   # per kNN layer (B, M) int64: insertion position (fifo) / last retrieval (lru)
    pk: tuple[Tensor, ...]      # per kNN layer (B, Hkv, Tp, hd): this segment's keys, joining at its end
    pv: tuple[Tensor, ...]
    ppos: Tensor                # (B, Tp) positions of the pending entries
    pvalid: Tensor              # (B, Tp) bool: rows out of step hold segments of different lengths
    live: Tensor | None = None  # store="mmap": (1,) int64 shared by the states over the same files
    gen: int = 0                # store="mmap": the `live` value this state was returned with


def unrotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Undo RoPE: x (B, h, T, d) rotated at positions (B, T) -> the position-free vector."""
    d = x.shape[-1]
    cos, sin = rope_tables(positions, d, theta, torch.float64)
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


class MemorizingTransformer(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: MemorizingConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.mem_layers = cfg.memory_layers(backbone.n_layers)
        self.slot = {l: i for i, l in enumerate(self.mem_layers)}
        self.gate = nn.Parameter(torch.full((len(self.mem_layers), backbone.n_heads), float(cfg.gate_init)))  # b_g

    def applies_to(self, layer: int) -> bool:
        return layer in self.mem_layers

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MemorizingState:
        b = self.backbone
        kv = lambda: torch.zeros(batch, b.kv_heads, 0, b.head_dim, device=device, dtype=dtype)  # noqa: E731
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        L = len(self.mem_layers)
        if self.cfg.store == "mmap":                                       # preallocated, written in place
            from memstack.memory.retrieval.mapped import mapped_zeros

            C, shape = self.cfg.mem_len, (batch, b.kv_heads, self.cfg.mem_len, b.head_dim)
            mk = tuple(mapped_zeros(shape, dtype, self.cfg.mmap_dir) for _ in range(L))
            mv = tuple(mapped_zeros(shape, dtype, self.cfg.mmap_dir) for _ in range(L))
            zc = torch.zeros(batch, C, dtype=torch.long, device=device)
            return MemorizingState(mk, mv, tuple(zc.bool() for _ in range(L)), tuple(zc for _ in range(L)),
                                   tuple(kv() for _ in range(L)), tuple(kv() for _ in range(L)), z, z.bool(),
                                   torch.zeros(1, dtype=torch.long), 0)
        return MemorizingState(tuple(kv() for _ in range(L)), tuple(kv() for _ in range(L)), tuple(z.bool() for _ in range(L)),
                               tuple(z for _ in range(L)), tuple(kv() for _ in range(L)), tuple(kv() for _ in range(L)), z,
                               z.bool())

    def reset(self, state: MemorizingState, mask: Tensor) -> MemorizingState:
        return MemorizingState(state.mk, state.mv, tuple(v & ~mask[:, None] for v in state.valid), state.stamp,
                               state.pk, state.pv, state.ppos, state.pvalid & ~mask[:, None], state.live, state.gen)

    def _check_live(self, state: MemorizingState) -> None:
        if state.live is not None and int(state.live[0]) != state.gen:
            raise RuntimeError("this memory-mapped Memorizing state was already consumed: a later call wrote its "
                               "files in place (store='mmap' states cannot be replayed; use store='memory')")

    def take_rows(self, state: MemorizingState, idx: Tensor) -> MemorizingState:
        if self.cfg.store == "mmap":
            raise ValueError("memorizing with store='mmap' keeps each row's memory in place in its files; its rows "
                             "cannot be split or regrouped (serve it with store='memory')")
        return super().take_rows(state, idx)

    def cat_rows(self, states: list[MemorizingState]) -> MemorizingState:
        if self.cfg.store == "mmap":
            self.take_rows(states[0], torch.zeros(0, dtype=torch.long))         # the same refusal
        return super().cat_rows(states)

    def _bytes_per_token(self, dtype: torch.dtype) -> int:
        b = self.backbone
        return len(self.mem_layers) * (2 * b.kv_heads * b.head_dim * dtype_bytes(dtype) + 1 + 8)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        return MemorySpec(bytes_per_token=self._bytes_per_token(dtype), max_tokens=self.cfg.mem_len,
                          slack_tokens=self.backbone.seg_len, dtype_bytes=dtype_bytes(dtype))

    def make_identity(self) -> bool:
        with torch.no_grad():
            self.gate.fill_(-1e4)   # sigmoid -> exactly 0: V = V_c
        return True

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"layers": [1], "mem_len": 40, "k": 4},
                {"layers": [0, 1], "mem_len": 20, "k": 3, "evict": "lru"},
                {"mem_len": 24, "k": 8, "evict": "fifo"}]

    # -- write: this chunk's keys wait for the end of the segment --------------------------------
    def attn(self, io: AttnIO, state: MemorizingState, ctx: StepContext) -> tuple[KVBlock | None, MemorizingState]:
        j = self.slot[io.layer]
        if j == 0:
            self._check_live(state)
        pos = ctx.positions[:, ctx.real]                                                  # (B, T)
        k = unrotate(io.k[:, :, ctx.real].detach(), pos, self.backbone.rope_theta)        # (B, Hkv, T, hd)
        v = io.v[:, :, ctx.real].detach()
        pk, pv = list(state.pk), list(state.pv)
        # pvalid is shared by the kNN layers and extended at the first: later layers read the part before this call
        before = state.pvalid if j == 0 else state.pvalid[:, :state.pk[j].shape[2]]
        pk[j], _ = segment_so_far(state.pk[j], k, ctx, 2, before)
        pv[j], _ = segment_so_far(state.pv[j], v, ctx, 2, before)
        ppos, pvalid = state.ppos, state.pvalid
        if j == 0:  # shared by all kNN layers: extended once
            ppos, pvalid = segment_so_far(state.ppos, pos, ctx, 1, before)
        return None, MemorizingState(state.mk, state.mv, state.valid, state.stamp, tuple(pk), tuple(pv), ppos, pvalid,
                                     state.live, state.gen)

    # -- read: top-k over the memory, gated with local attention --------------------------------
    def attn_out(self, layer: int, q: Tensor, out: Tensor, state: MemorizingState, ctx: StepContext) -> tuple[Tensor, MemorizingState]:
        j = self.slot[layer]
        mk, mv, valid, stamp = state.mk[j], state.mv[j], state.valid[j], state.stamp[j]
        qr = unrotate(q, ctx.positions, self.backbone.rope_theta)                         # (B, H, T', hd)
        if self.cfg.store == "mmap":                   # select over the mapped arrays; recompute over the k rows
            from memstack.memory.retrieval.mapped import read_gathered

            self._check_live(state)
            with torch.no_grad():
                _, has, idx = topk_attention(qr.detach(), mk, mv, valid, self.cfg.k)
            vm = read_gathered(qr, mk, mv, idx)                                           # (B, H, T', hd)
        else:
            vm, has, idx = topk_attention(qr, mk, mv, valid, self.cfg.k)                  # (B, H, T', hd)
        g = torch.sigmoid(self.gate[j]).to(out.dtype)[None, :, None, None]                # (1, H, 1, 1)
        out = torch.where(has[..., None], g * vm.to(out.dtype) + (1 - g) * out, out)
        if self.cfg.evict == "lru" and mk.shape[2]:
            B, H, T, kk = idx.shape
            when = ctx.positions[:, None, :, None].expand(B, H, T, kk).reshape(B, -1)    # retrieval time
            flat = idx.reshape(B, -1)
            when = torch.where(flat >= 0, when, torch.full_like(when, -1))
            stamp = stamp.scatter_reduce(1, flat.clamp(min=0), when, reduce="amax")
        mks, mvs, vals, stamps = list(state.mk), list(state.mv), list(state.valid), list(state.stamp)
        pk, pv, ppos, pvalid = list(state.pk), list(state.pv), state.ppos, state.pvalid
        if ctx.all_end and bool(state.pvalid.all()):
            mks[j], mvs[j], vals[j], stamps[j] = self._merge(mk, mv, valid, stamp, state.pk[j], state.pv[j], state.ppos,
                                                             state.pvalid)
            pk[j], pv[j] = state.pk[j][:, :, :0].clone(), state.pv[j][:, :, :0].clone()
            if j == len(self.mem_layers) - 1:
                ppos, pvalid = state.ppos[:, :0].clone(), state.pvalid[:, :0].clone()
        elif ctx.any_end:  # rows out of step: the rows closing a segment merge theirs, the others wait
            from memstack.memory.state import compact_index, gather_entries

            end = ctx.seg_end[:, None]
            mks[j], mvs[j], vals[j], stamps[j] = self._merge(mk, mv, valid, stamp, state.pk[j], state.pv[j], state.ppos,
                                                             state.pvalid & end)
            idx, ok = compact_index(state.pvalid & ~end)
            pk[j], pv[j] = gather_entries(state.pk[j], idx, 2), gather_entries(state.pv[j], idx, 2)
            if j == len(self.mem_layers) - 1:
                ppos, pvalid = gather_entries(state.ppos, idx), ok
        else:
            stamps[j] = stamp
        gen = state.gen
        if state.live is not None and ctx.any_end and j == len(self.mem_layers) - 1:
            state.live += 1                                                   # every state before this one is consumed
            gen = int(state.live[0])
        return out, MemorizingState(tuple(mks), tuple(mvs), tuple(vals), tuple(stamps), tuple(pk), tuple(pv), ppos, pvalid,
                                    state.live, gen)

    def _merge(self, mk: Tensor, mv: Tensor, valid: Tensor, stamp: Tensor, pk: Tensor, pv: Tensor, ppos: Tensor,
               pvalid: Tensor):
        """Append the segment's (valid) entries; if that overflows mem_len, evict the slots with
        the oldest stamps (invalid slots first). Never a reset. (store="mmap": the same set, kept
        in place in the preallocated files: mapped.merge_in_place.)"""
        if self.cfg.store == "mmap":
            from memstack.memory.retrieval.mapped import merge_in_place

            valid, stamp = merge_in_place(mk, mv, valid, stamp, pk, pv, ppos, pvalid)
            return mk, mv, valid, stamp
        k, v = torch.cat([mk, pk], 2), torch.cat([mv, pv], 2)                             # (B, Hkv, M+P, hd)
        ok = torch.cat([valid, pvalid], 1)                                                # (B, M+P)
        st = torch.cat([stamp, ppos], 1)
        C = self.cfg.mem_len
        if k.shape[2] <= C:
            return k, v, ok, st
        prio = torch.where(ok, st, torch.full_like(st, -1))
        # keep the C newest by stamp; ties broken towards later slots (stable: newer entries win)
        order = torch.arange(prio.shape[1], device=prio.device)
        keep = (prio * (prio.shape[1] + 1) + order).topk(C, dim=1).indices.sort(dim=1).values   # (B, C)
        gk = keep[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        return k.gather(2, gk), v.gather(2, gk), ok.gather(1, keep), st.gather(1, keep)
