"""The engine's attention backend: the model's own blocks attend over the shared paged K/V pool.

vLLM v1's model runner builds attention metadata (block tables, slot mapping, sequence lengths)
and hands it to the model, whose attention layers write the step's K/V into the paged cache and
read it back through the tables. `PagedAttention` is that metadata for one forward call of
`MemoryModel` (backbone/attention.py is the protocol): every row of the call is one request,

    block_tables (B, nb)   the request's blocks, in logical order (relative to its first held block)
    slot0 (B,)             the slot its chunk's first token goes to
    start (B,)             its first visible slot (the context policy: segment / document / window)

`begin(ctx)` turns them into the slot of every token of the extended chunk: valid tokens (the real
ones, and the memory tokens that exist for this row) take consecutive slots from slot0, invalid
ones none -- so a request's slots hold exactly what a dense KV cache memory of the same model would
hold, memory tokens included. At each layer `attend` writes the chunk's K/V into those slots, then
each query attends over [the memories' own K/V blocks (XL memory, prefix, latents, ...); the row's
visible slots up to and including its own (causal)]:

- decode rows with nothing else to read: `paged_decode` (the ops' fast path: Triton on CUDA);
- one prefill row with nothing else: `paged_prefill`;
- otherwise the visible slots are gathered and the memories' blocks put in front (one masked SDPA).
"""
from __future__ import annotations

import torch
from torch import Tensor

from memstack.memory.base import KVBlock, StepContext
from memstack.memory.kv.store import PagedKVCache
from memstack.ops.attention import attention
from memstack.ops.paged_attention import paged_decode, paged_prefill


class PagedAttention:
    def __init__(self, cache: PagedKVCache, block_tables: Tensor, slot0: Tensor, start: Tensor):
        self.cache, self.bs = cache, cache.spec.block_size
        self.tables = block_tables                                  # (B, nb) int64
        self.slot0, self.start = slot0, start                       # (B,) int64
        self.end: Tensor | None = None                              # (B,) slots written + held, after begin
        self.n_written: Tensor | None = None                        # (B,) slots this call writes per row
        self.pad_lengths: Tensor | None = None                      # (B,) real tokens per row when rows are padded
        # set by a caller that knows the chunk has no memory tokens (its slots follow from Python
        # lists): the physical slot of every token in row order, the row lengths and the largest end
        self.known: tuple[Tensor, list[int], int] | None = None

    def begin(self, ctx: StepContext) -> None:
        B, Tx = ctx.positions.shape
        dev = self.tables.device
        if self.known is not None and ctx.valid is None:
            if self.pad_lengths is not None or any(n != Tx for n in self.known[1]):
                raise RuntimeError("known slots are for rows of equal length")
            self.write_slots, n, need = self.known
            self.n_written = None
            self.written_list = n
            self.rows = self.toks = None
            self.end = self.slot0 + Tx
            self.q_slot = self.slot0[:, None] + torch.arange(Tx, device=dev) if Tx > 1 or B == 1 else None
            self.simple = True
            if need > self.tables.shape[1] * self.bs:
                raise RuntimeError(f"the chunk needs {need} slots but only {self.tables.shape[1] * self.bs} are allocated")
            return
        valid = ctx.valid
        if self.pad_lengths is not None:                             # rows of a padded call: the padding is not there
            pad = torch.arange(Tx, device=dev)[None] < self.pad_lengths[:, None]
            valid = pad if valid is None else valid.to(dev) & pad
        if valid is None:
            offs = torch.arange(Tx, device=dev).expand(B, Tx)
            self.n_written = torch.full((B,), Tx, dtype=torch.long, device=dev)
            self.rows = self.toks = None
        else:
            valid = valid.to(dev)
            offs = valid.long().cumsum(1) - 1
            self.n_written = valid.sum(1)
            self.rows, self.toks = valid.nonzero(as_tuple=True)     # (N,) the valid tokens
        self.q_slot = self.slot0[:, None] + offs                      # (B, T') the slot of each token
        self.end = self.slot0 + self.n_written
        self.written_list = None
        need = int(self.end.max())
        if need > self.tables.shape[1] * self.bs:
            raise RuntimeError(f"the chunk needs {need} slots but only {self.tables.shape[1] * self.bs} are allocated "
                               "(the engine reserved too few; a memory added more tokens than it declares?)")
        s = self.q_slot if self.rows is None else self.q_slot[self.rows, self.toks]
        r = torch.arange(B, device=dev)[:, None].expand(B, Tx) if self.rows is None else self.rows
        phys = self.tables[r, s // self.bs] * self.bs + s % self.bs
        self.write_slots = phys.reshape(-1)                           # physical slot of each valid token
        self.simple = valid is None

    def _chunk(self, x: Tensor) -> Tensor:
        """(B, Hkv, T', hd) -> the valid tokens' rows (N, Hkv, hd), in write_slots order."""
        if self.rows is None:
            return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])
        return x.transpose(1, 2)[self.rows, self.toks]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, extras: list[KVBlock], ctx: StepContext) -> Tensor:
        if any(e.includes_chunk for e in extras):
            raise RuntimeError("a memory returned its own KV cache while the engine's pool holds the context "
                               "(the engine should have dropped that memory)")
        self.cache.write(layer, self.write_slots, self._chunk(k), self._chunk(v))
        kc, vc = self.cache.layer(layer)
        B, H, T, hd = q.shape
        if not extras and self.simple:
            if T == 1:
                return paged_decode(q[:, :, 0], kc, vc, self.tables, self.start, self.end)[:, :, None]
            if B == 1:
                o = paged_prefill(q[0].transpose(0, 1), kc, vc, self.tables[0], int(self.start[0]), int(self.end[0]))
                return o.transpose(0, 1)[None]                        # (1, H, T, hd)
        K, V, mask = self._gather(kc, vc)                             # (B, Hkv, S, hd), (B, T', S)
        if extras:
            ones = lambda e: torch.ones(B, e.k.shape[2], dtype=torch.bool, device=q.device)  # noqa: E731
            K = torch.cat([e.k for e in extras] + [K], 2)
            V = torch.cat([e.v for e in extras] + [V], 2)
            ev = torch.cat([e.valid if e.valid is not None else ones(e) for e in extras], 1)   # (B, S_e)
            mask = torch.cat([ev[:, None, :].expand(B, T, ev.shape[1]), mask], 2)
        return attention(q, K, V, mask)

    def _gather(self, kc: Tensor, vc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every row's slots [0, max end) gathered through its table, with the mask of what each
        query sees: its row's visible slots up to its own (an invalid query sees all of them)."""
        B = self.tables.shape[0]
        nb = -(-(int(self.end.max()) if self.known is None else self.known[2]) // self.bs)
        ids = self.tables[:, :nb]                                     # (B, nb)
        Hkv, hd = kc.shape[1], kc.shape[3]
        K = kc[ids].permute(0, 2, 1, 3, 4).reshape(B, Hkv, nb * self.bs, hd)
        V = vc[ids].permute(0, 2, 1, 3, 4).reshape(B, Hkv, nb * self.bs, hd)
        s = torch.arange(nb * self.bs, device=ids.device)
        q_slot = self.q_slot if self.q_slot is not None else self.slot0[:, None]
        upto = q_slot if self.simple else torch.where(self.valid_q, q_slot, self.end[:, None] - 1)
        mask = (s[None, None, :] >= self.start[:, None, None]) & (s[None, None, :] <= upto[:, :, None])
        return K, V, mask

    @property
    def valid_q(self) -> Tensor:
        v = torch.zeros_like(self.q_slot, dtype=torch.bool)
        v[self.rows, self.toks] = True
        return v

    def written(self) -> list[int]:
        """Slots this call wrote per row (real and memory tokens)."""
        return self.written_list if self.written_list is not None else self.n_written.tolist()
