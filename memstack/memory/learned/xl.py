"""Transformer-XL segment recurrence (Dai et al., arXiv 1901.02860).

What it stores: for every layer with memory, the hidden states entering that layer for the last
`mem_len` tokens of the document (the "mems"), with their positions, stop-gradient.
Read: layer n of the current segment attends over [K/V(SG(mems_n)); segment]; the memory's K/V
are recomputed from the cached hidden states with the layer's *current* norm, projections and
RoPE, so W_k / W_v receive gradient through the memory while the cached states do not.
Write: at the end of each segment, the segment's hidden states are appended and the memory is
truncated FIFO to the last `mem_len` tokens (the paper's `_update_mems`, without its
qlen/mlen swap bug -- kimiyoung/transformer-xl #59). When a segment arrives in chunks (decoding),
its states wait in `pending` until the segment ends, so chunked and one-shot processing agree.

Deviations from the paper:
- positions: RoPE at each token's absolute document position instead of XL's relative
  sinusoids with u/v biases. RoPE is relative by construction, so cached keys rotated at their
  own positions give the same scores as XL's R_{i-j}; the test that XL with mem_len >= the
  document equals one pass over the whole document checks exactly this.
- memory tokens added by other memories are not cached (only the document's real tokens).
- the effective context grows with depth (~ n_layers * mem_len), as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext, dtype_bytes, segment_so_far
from memstack.memory.learned.config import XLConfig


@dataclass
class XLState:
    mems: tuple[Tensor, ...]      # per memory layer (B, M, D), detached; M <= mem_len
    pos: Tensor                   # (B, M) int64 positions of the memory slots
    valid: Tensor                 # (B, M) bool
    pending: tuple[Tensor, ...]   # per memory layer (B, Tp, D): this segment's states so far
    pending_pos: Tensor           # (B, Tp)


@dataclass
class Evicted:
    """What the FIFO memory of one layer dropped at a segment end (oldest first)."""

    h: Tensor       # (B, E, D) hidden states, stop-gradient
    pos: Tensor     # (B, E) positions
    valid: Tensor   # (B, E) bool


def _keep_last(x: Tensor, n: int) -> Tensor:
    """The last n entries along dim 1, as their own tensor (a slice would keep the whole alive)."""
    return x[:, -n:].clone() if x.shape[1] > n else x


class TransformerXL(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: XLConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.mem_layers = [l for l in range(backbone.n_layers) if self.applies_to(l)]
        self.slot = {l: i for i, l in enumerate(self.mem_layers)}   # layer -> index into mems

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> XLState:
        empty = lambda: torch.zeros(batch, 0, self.backbone.d_model, device=device, dtype=dtype)  # noqa: E731
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return XLState(tuple(empty() for _ in self.mem_layers), z, z.bool(), tuple(empty() for _ in self.mem_layers), z)

    def reset(self, state: XLState, mask: Tensor) -> XLState:
        return XLState(state.mems, state.pos, state.valid & ~mask[:, None], state.pending, state.pending_pos)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        per_tok = len(self.mem_layers) * self.backbone.d_model * dtype_bytes(dtype) + 8 + 1  # states + pos + valid
        return MemorySpec(bytes_per_token=per_tok, max_tokens=self.cfg.mem_len, dtype_bytes=dtype_bytes(dtype))

    def attn(self, io: AttnIO, state: XLState, ctx: StepContext) -> tuple[KVBlock | None, XLState]:
        block = self.read(io, state)
        state, _ = self.write(io, state, ctx)
        return block, state

    def read(self, io: AttnIO, state: XLState) -> KVBlock | None:
        """K/V of layer io.layer's memory, re-projected with the layer's current weights."""
        j = self.slot[io.layer]
        if not state.mems[j].shape[1]:
            return None
        k, v = io.project_kv(state.mems[j], state.pos)               # (B, Hkv, M, hd)
        return KVBlock(k, v, state.valid)

    def write(self, io: AttnIO, state: XLState, ctx: StepContext) -> tuple[XLState, Evicted | None]:
        """Append the chunk's (stop-gradient) states; at a segment end push the segment into the
        FIFO memory. Returns the new state and what the FIFO dropped at this layer (None if nothing)."""
        j = self.slot[io.layer]
        h_new = io.h[:, ctx.real].detach()                            # (B, T, D) stop-gradient
        pos_new = ctx.positions[:, ctx.real]
        pending = segment_so_far(state.pending[j], h_new, ctx)
        pending_pos = segment_so_far(state.pending_pos, pos_new, ctx)
        mems, pend = list(state.mems), list(state.pending)
        evicted = None
        if ctx.seg_end:  # the segment is complete: push it into the FIFO memory
            full = torch.cat([state.mems[j], pending], dim=1)         # (B, M + Tp, D)
            n_out = full.shape[1] - self.cfg.mem_len
            if n_out > 0:
                # pos/valid are shared by all layers and only updated at the last one, so every
                # layer sees the pre-update values here
                full_pos = torch.cat([state.pos, pending_pos], dim=1)
                full_valid = torch.cat([state.valid, torch.ones_like(pending_pos, dtype=torch.bool)], dim=1)
                evicted = Evicted(full[:, :n_out], full_pos[:, :n_out], full_valid[:, :n_out])
            mems[j] = _keep_last(full, self.cfg.mem_len)
            pend[j] = pending.new_zeros(pending.shape[0], 0, pending.shape[2])
        else:
            pend[j] = pending
        pos, valid, ppos = state.pos, state.valid, state.pending_pos
        if j == len(self.mem_layers) - 1:  # bookkeeping shared by all layers: once, at the last
            if ctx.seg_end:
                pos = _keep_last(torch.cat([state.pos, pending_pos], dim=1), self.cfg.mem_len)
                valid = _keep_last(torch.cat([state.valid, torch.ones_like(pending_pos, dtype=torch.bool)], dim=1), self.cfg.mem_len)
                ppos = pending_pos.new_zeros(pending_pos.shape[0], 0)
            else:
                ppos = pending_pos
        return XLState(tuple(mems), pos, valid, tuple(pend), ppos), evicted

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"mem_len": 64}, {"mem_len": 10}, {"mem_len": 24, "layers": [1]}]
