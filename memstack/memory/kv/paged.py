"""Paged KV cache as a memory (`kv_paged`): vLLM's PagedAttention layout (arXiv 2309.06180)
behind the one memory interface, with compression that frees whole blocks.

What it stores, per example row: a pool of physical blocks (every layer's K and V of
`block_size` tokens in one contiguous block, memory/kv/store.py's layout), a block table mapping
the row's logical blocks to physical ones, a validity mask, and -- with KIVI -- the quantized
blocks (codes + scales) that precede the full-precision ones. Read: each layer attends over the
held slots (quantized blocks dequantized, full-precision blocks gathered through the table) and,
causally, the chunk. Write: the chunk's K/V go to the next slots; blocks are allocated on
demand from the row's free blocks and the pool doubles when none is left.

Freeing whole blocks: a document window drops the blocks wholly before the window (the partial
one is masked); compression (memory/kv/compress) keeps the selected slots of each (layer, KV
head), compacts them into the first ceil(k / block_size) blocks and returns the rest to the free
list; KIVI replaces full-precision blocks by their codes. With compression off, `kv_paged`
equals `kv_dense` (tests/memory/kv/test_paged.py, and the contract suite).

Deviations from a serving engine (memstack/engine is the shared-pool one): the state is
batch-first like every memory state -- each row owns its blocks, so rows cannot share prefix
blocks here; rows advance together, so their block tables are identical. The backbone appends
the chunk's own K/V (the block returned holds only the past), so the training path keeps the
chunk's gradient; past K/V are stored detached (stop-gradient, as kv_dense).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.kv.compress import budget, keep_indices
from memstack.memory.kv.compress.h2o import attention_received
from memstack.memory.kv.compress.kivi import dequantize_keys_values, quantize_blocks
from memstack.memory.kv.compress.snapkv import snap_scores
from memstack.memory.kv.compress.streaming import streaming_scores
from memstack.memory.kv.config import PagedKVConfig


@dataclass
class PagedKVState:
    kv: Tensor        # (B, P, L, 2, Hkv, bs, hd) physical full-precision blocks of each row
    table: Tensor     # (B, NB) int64 logical full-precision block -> physical block
    valid: Tensor     # (B, Q*bs + NB*bs) bool: quantized slots, then full-precision slots
    score: Tensor     # (B, L, Hkv, NB*bs) fp32 attention scores (h2o / snapkv); (B, 0, 0, 0) otherwise
    qk: Tensor        # (B, Q, L, Hkv, bs, hd*bits/8) uint8 key codes of quantized blocks (kivi)
    qk_scale: Tensor  # (B, Q, L, Hkv, 1, hd)   per channel
    qk_zero: Tensor   # (B, Q, L, Hkv, 1, hd)
    qv: Tensor        # (B, Q, L, Hkv, bs, hd*bits/8)
    qv_scale: Tensor  # (B, Q, L, Hkv, bs, 1)   per token
    qv_zero: Tensor   # (B, Q, L, Hkv, bs, 1)
    n_slots: int      # full-precision slots written
    start: int        # full-precision slots before this are outside the window (masked)
    seen: int         # tokens written since the cache was last cleared (compression budget)


class PagedKV(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: PagedKVConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.last_layer = backbone.n_layers - 1
        self.bs = cfg.block_size
        self.policy = cfg.compression.policy
        self.scorer = None
        if self.policy == "learned":
            from memstack.errors import ConfigError
            from memstack.memory.kv.compress.learned import load_scorer

            self.scorer = load_scorer(cfg.compression.scorer)
            reasons = self.scorer.check_fits(backbone.n_layers, backbone.kv_heads, backbone.head_dim)
            if reasons:
                raise ConfigError(reasons, "kv_paged learned compression")

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> PagedKVState:
        b, bs, c = self.backbone, self.bs, self.cfg.compression
        L, H, hd = b.n_layers, b.kv_heads, b.head_dim
        kv = torch.zeros(batch, self.cfg.initial_blocks, L, 2, H, bs, hd, device=device, dtype=dtype)
        scored = self.policy in ("h2o", "snapkv")
        score = torch.zeros(batch, L if scored else 0, H if scored else 0, 0, device=device)
        nq = hd * c.bits // 8 if self.policy == "kivi" else 0
        q = lambda *s, dt=torch.float32: torch.zeros(batch, 0, L, H, *s, device=device, dtype=dt)  # noqa: E731
        return PagedKVState(kv, torch.zeros(batch, 0, dtype=torch.long, device=device),
                            torch.zeros(batch, 0, dtype=torch.bool, device=device), score,
                            q(bs, nq, dt=torch.uint8), q(1, hd), q(1, hd), q(bs, nq, dt=torch.uint8), q(bs, 1), q(bs, 1),
                            0, 0, 0)

    def reset(self, state: PagedKVState, mask: Tensor) -> PagedKVState:
        s = PagedKVState(**vars(state))
        s.valid = state.valid & ~mask[:, None]
        return s

    def cat_rows(self, states: list[PagedKVState]) -> PagedKVState:
        """Rows of different lengths: each row's full-precision slots right-aligned (left-padded
        with invalid slots) into fresh blocks. Compressed or quantized rows cannot be regrouped."""
        if self.policy != "none":
            raise ValueError(f"kv_paged rows compressed with {self.policy!r} cannot be regrouped (their slots are "
                             "scored / quantized together); run them in step")
        bs, n = self.bs, max(s.n_slots for s in states)
        nb = -(-n // bs)
        kvs, valids = [], []
        for s in states:
            B = s.kv.shape[0]
            x = s.kv[self._rows(s), s.table]                                     # (B, NB, L, 2, Hkv, bs, hd)
            x = x.permute(0, 2, 3, 4, 1, 5, 6).flatten(4, 5)[..., :s.n_slots, :]  # (B, L, 2, Hkv, S, hd)
            x = torch.nn.functional.pad(x, (0, 0, n - s.n_slots, nb * bs - n))
            kvs.append(x.unflatten(4, (nb, bs)).permute(0, 4, 1, 2, 3, 5, 6))   # (B, nb, L, 2, Hkv, bs, hd)
            valids.append(torch.cat([s.valid.new_zeros(B, n - s.n_slots), s.valid[:, :s.n_slots],
                                     s.valid.new_zeros(B, nb * bs - n)], 1))
        first = states[0]
        kv = torch.cat(kvs)
        B = kv.shape[0]
        out = self.init_state(B, kv.device, kv.dtype)
        out.kv, out.valid = kv, torch.cat(valids)
        out.table = torch.arange(nb, device=kv.device).expand(B, nb).clone()
        out.n_slots, out.seen = n, max(s.seen for s in states)
        del first
        return out

    def _clear(self, s: PagedKVState) -> PagedKVState:
        fresh = self.init_state(s.kv.shape[0], s.kv.device, s.kv.dtype)
        fresh.kv = s.kv                                                          # keep the pool, free every block
        return fresh

    # -- size ----------------------------------------------------------------------------------
    def _fp_bytes_per_token(self, dtype: torch.dtype) -> int:
        b = self.backbone
        return 2 * b.n_layers * b.kv_heads * b.head_dim * dtype_bytes(dtype) + 1   # K, V and valid

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        """Uncompressed size (an upper bound when compression is on)."""
        seg = self.backbone.seg_len
        held = seg if self.cfg.scope == "segment" else self.cfg.window
        return MemorySpec(bytes_per_token=self._fp_bytes_per_token(dtype), max_tokens=held, slack=2.0,
                          slack_tokens=(self.cfg.initial_blocks + 2) * self.bs + seg, dtype_bytes=dtype_bytes(dtype))

    def held_bytes(self, s: PagedKVState) -> int:
        B = s.kv.shape[0]
        quant = sum(t.numel() * t.element_size() for t in (s.qk, s.qk_scale, s.qk_zero, s.qv, s.qv_scale, s.qv_zero))
        return B * (s.n_slots - s.start) * self._fp_bytes_per_token(s.kv.dtype) + quant + B * s.qk.shape[1] * self.bs

    # -- blocks --------------------------------------------------------------------------------
    def _ensure(self, s: PagedKVState, n: int) -> None:
        """Blocks for n more slots: the lowest free physical ids of the row's pool (doubling it
        when none are left)."""
        B, bs = s.kv.shape[0], self.bs
        need = -(-(s.n_slots + n) // bs) - s.table.shape[1]
        if need <= 0:
            return
        used = set(s.table[0].tolist()) if B else set()
        free = [i for i in range(s.kv.shape[1]) if i not in used]
        if len(free) < need:
            P = s.kv.shape[1]
            newP = max(2 * P, P + need - len(free))
            grown = s.kv.new_zeros(B, newP, *s.kv.shape[2:])
            grown[:, :P] = s.kv
            s.kv = grown
            free += list(range(P, newP))
        ids = torch.tensor(free[:need], device=s.kv.device).expand(B, need)
        s.table = torch.cat([s.table, ids], 1)
        s.valid = torch.cat([s.valid, s.valid.new_zeros(B, need * bs)], 1)
        if s.score.shape[1]:
            s.score = torch.cat([s.score, s.score.new_zeros(*s.score.shape[:3], need * bs)], 3)

    def _rows(self, s: PagedKVState) -> Tensor:
        return torch.arange(s.kv.shape[0], device=s.kv.device)[:, None]

    def _gather(self, s: PagedKVState, layer: int, n: int) -> tuple[Tensor, Tensor]:
        """Full-precision slots [0, n) of a layer: (B, Hkv, n, hd) K and V."""
        x = s.kv[:, :, layer][self._rows(s), s.table]                            # (B, NB, 2, Hkv, bs, hd)
        B, NB, _, H, bs, hd = x.shape
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, 2, H, NB * bs, hd)[:, :, :, :n]
        return x[:, 0], x[:, 1]

    def _past(self, s: PagedKVState, layer: int) -> tuple[Tensor, Tensor]:
        k, v = self._gather(s, layer, s.n_slots)
        if s.qk.shape[1]:                                                        # quantized blocks come first
            kq, vq = dequantize_keys_values(s.qk[:, :, layer], s.qk_scale[:, :, layer], s.qk_zero[:, :, layer],
                                            s.qv[:, :, layer], s.qv_scale[:, :, layer], s.qv_zero[:, :, layer],
                                            self.cfg.compression.bits)          # (B, Q, Hkv, bs, hd)
            B, Q, H, bs, hd = kq.shape
            kq = kq.permute(0, 2, 1, 3, 4).reshape(B, H, Q * bs, hd).to(k.dtype)
            vq = vq.permute(0, 2, 1, 3, 4).reshape(B, H, Q * bs, hd).to(v.dtype)
            k, v = torch.cat([kq, k], 2), torch.cat([vq, v], 2)
        return k, v

    def _write(self, s: PagedKVState, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v (B, Hkv, T, hd) into full-precision slots [n_slots, n_slots + T)."""
        T = k.shape[2]
        slot = torch.arange(s.n_slots, s.n_slots + T, device=k.device)
        blk = s.table[:, slot // self.bs]                                        # (B, T)
        off = (slot % self.bs)[None]                                             # (1, T)
        s.kv[self._rows(s), blk, layer, 0, :, off] = k.detach().transpose(1, 2).to(s.kv.dtype)   # (B, T, Hkv, hd)
        s.kv[self._rows(s), blk, layer, 1, :, off] = v.detach().transpose(1, 2).to(s.kv.dtype)

    # -- the site ------------------------------------------------------------------------------
    def attn(self, io: AttnIO, s: PagedKVState, ctx: StepContext) -> tuple[KVBlock | None, PagedKVState]:
        T, l = io.k.shape[2], io.layer
        if l == 0:
            if self.policy != "none" and ((ctx.any_end and not ctx.all_end) or (ctx.any_start and not ctx.all_start)):
                raise ValueError(f"kv_paged with {self.policy} compression compresses every row at once: its rows "
                                 "must open and close segments together (serve it with per-request compression)")
            if ctx.all_start and self.cfg.scope == "segment":
                s = self._clear(s)
            else:
                s = PagedKVState(**vars(s))                                      # a new state object per call
                if ctx.any_start and self.cfg.scope == "segment":              # rows out of step: forget theirs
                    s.valid = s.valid & ~ctx.seg_start[:, None]
            self._ensure(s, T)
        nq = s.qk.shape[1] * self.bs
        pk, pv = self._past(s, l)
        pvalid = s.valid[:, :nq + s.n_slots]
        block = KVBlock(pk, pv, pvalid) if pk.shape[2] else None
        if self.policy in ("h2o", "snapkv"):
            with torch.no_grad():
                keys = torch.cat([pk, io.k.detach()], 2)
                if self.policy == "h2o":
                    s.score[:, l, :, :s.n_slots + T] += attention_received(io.q.detach(), keys, pvalid, T)
                elif ctx.all_end:
                    c = self.cfg.compression
                    s.score[:, l, :, :s.n_slots + T] = snap_scores(io.q.detach(), keys, pvalid, c.recent, c.pool_kernel)
        self._write(s, l, io.k, io.v)
        if l == self.last_layer:
            valid = s.valid.clone()                                              # this call's blocks view the old one
            valid[:, nq + s.n_slots:nq + s.n_slots + T] = True if ctx.valid is None else ctx.valid
            s.valid = valid
            s.n_slots += T
            s.seen += T
            if ctx.any_end:
                if self.cfg.window is not None:
                    self._window(s, ctx)
                elif self.policy == "kivi":
                    self._quantize(s)
                elif self.policy != "none":
                    self._compress(s)
            if ctx.any_start and not ctx.all_start and self.cfg.scope == "segment":
                self._free_dead(s)
        return block, s

    def _window(self, s: PagedKVState, ctx: StepContext) -> None:
        """Rows closing a segment keep their last `window` valid slots; blocks no row can see are freed."""
        if ctx.all_end and bool(s.valid.all()):
            self._trim(s, self.cfg.window)                                        # rows in step
            return
        nq = s.qk.shape[1] * self.bs
        held = s.valid[:, nq:nq + s.n_slots]
        from_right = held.long().flip(1).cumsum(1).flip(1)
        keep = held & ((from_right <= self.cfg.window) | ~ctx.seg_end[:, None])
        s.valid = torch.cat([s.valid[:, :nq], keep, s.valid[:, nq + s.n_slots:]], 1)
        self._free_dead(s)

    def _free_dead(self, s: PagedKVState) -> None:
        """Free the leading full-precision blocks whose slots no row can see any more."""
        from memstack.memory.state import drop_leading_invalid

        nq = s.qk.shape[1] * self.bs
        lead = drop_leading_invalid(s.valid[:, nq:nq + s.n_slots])
        if lead >= self.bs:
            self._drop_leading(s, lead // self.bs)

    # -- freeing whole blocks ------------------------------------------------------------------
    def _drop_leading(self, s: PagedKVState, nb: int) -> None:
        s.table = s.table[:, nb:]
        s.valid = torch.cat([s.valid[:, :s.qk.shape[1] * self.bs], s.valid[:, s.qk.shape[1] * self.bs + nb * self.bs:]], 1)
        s.n_slots -= nb * self.bs

    def _trim(self, s: PagedKVState, window: int) -> None:
        """Keep the last `window` slots: free the blocks wholly before them, mask the rest."""
        cut = s.n_slots - window
        if cut <= 0:
            return
        self._drop_leading(s, cut // self.bs)
        s.start = cut % self.bs
        s.valid[:, :s.start] = False

    def _compress(self, s: PagedKVState) -> None:
        c, S = self.cfg.compression, s.n_slots
        k = budget(s.seen, c.keep_ratio)
        if S <= k:
            return
        B, L, H = s.kv.shape[0], self.backbone.n_layers, self.backbone.kv_heads
        x = s.kv[self._rows(s), s.table]                                         # (B, NB, L, 2, Hkv, bs, hd)
        NB, hd = x.shape[1], x.shape[-1]
        x = x.permute(0, 2, 3, 4, 1, 5, 6).reshape(B, L, 2, H, NB * self.bs, hd)
        if self.policy == "streaming":
            scores, recent, sinks = streaming_scores(B, L, H, S, s.kv.device), max(k - c.sink_tokens, 0), c.sink_tokens
        elif self.policy == "learned":
            recent = min(c.recent, k)
            scores, sinks = self.scorer.scores(x[..., :S, :]), min(c.sink_tokens, k - recent)
        else:
            scores, recent, sinks = s.score[..., :S], min(c.recent, k), 0
        idx = keep_indices(scores, s.valid[:, :S], k, recent, sinks)             # (B, L, Hkv, k)
        kept = x.gather(4, idx[:, :, None, :, :, None].expand(B, L, 2, H, k, hd))  # (B, L, 2, Hkv, k, hd)
        nbk = -(-k // self.bs)
        pad = kept.new_zeros(B, L, 2, H, nbk * self.bs - k, hd)
        blocks = torch.cat([kept, pad], 4).reshape(B, L, 2, H, nbk, self.bs, hd).permute(0, 4, 1, 2, 3, 5, 6)
        table = s.table[:, :nbk]                                                 # compact into the first blocks;
        s.kv[self._rows(s), table] = blocks                                      # the other NB - nbk are freed
        n_valid = s.valid[:, :S].sum(1, keepdim=True)
        s.valid = torch.arange(nbk * self.bs, device=s.kv.device)[None] < n_valid.clamp(max=k)
        if s.score.shape[1]:
            sc = s.score[..., :S].gather(3, idx)
            s.score = torch.cat([sc, sc.new_zeros(B, L, H, nbk * self.bs - k)], 3)
        s.table, s.n_slots, s.start = table, k, 0

    def _quantize(self, s: PagedKVState) -> None:
        """KIVI: full blocks older than the residual window become 2/4-bit codes."""
        nb = (s.n_slots - self.cfg.compression.recent) // self.bs
        if nb <= 0:
            return
        x = s.kv[self._rows(s), s.table[:, :nb]]                                 # (B, nb, L, 2, Hkv, bs, hd)
        parts = quantize_blocks(x, self.cfg.compression.bits)
        for name, t in zip(("qk", "qk_scale", "qk_zero", "qv", "qv_scale", "qv_zero"), parts):
            setattr(s, name, torch.cat([getattr(s, name), t.to(getattr(s, name).dtype)], 1))
        s.table = s.table[:, nb:]                                                # their full-precision blocks are free
        s.n_slots -= nb * self.bs                                                # (valid keeps its layout)

    def make_identity(self) -> bool:
        return self.cfg.scope == "segment"

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"scope": "document", "block_size": 4}, {"scope": "document", "block_size": 8, "window": 20,
                "initial_blocks": 1}, {"scope": "segment", "block_size": 5}]
