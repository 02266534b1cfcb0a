"""Recurrent Memory Transformer (Bulatov et al., arXiv 2207.06881; scaling report arXiv 2304.11062).

What it stores: m memory vectors per example, (B, m, D), carried from one segment to the next,
plus a per-example flag "no memory written yet" (the first segment of a document then reads a
learned initial memory, a parameter).
Read: the memory is prepended to the segment as m read tokens.
Write: the same memory is appended as m write tokens; under causal attention they see the whole
segment, and their final hidden states become the next memory: [read; segment; write] ->
memory' = norm(h_write).
Gradients: the carried memory keeps its autograd graph, so the trainer's BPTT policy (full,
truncated every k segments, detached -- train/segments.py) decides how far back a loss reaches.
tests/memory/learned/test_rmt.py checks that truncation really cuts the gradient through this
state (the public code's `k2` is a no-op on its default branch: `manage_gradients` detaches
into a local variable).

Deviations from the paper / public code:
- the new memory is the write tokens' last-block output passed through this memory's own RMSNorm
  (learned gain). The public code takes GPT-2's `hidden_states[-1]`, which is after the final
  layer norm; our EMBED site hands over the pre-norm stream, and an un-normalised memory drifts in
  scale over thousands of segments.
- positions: RoPE at document positions; read tokens take the m positions just before the
  segment, write tokens the m positions just after (GPT-2's absolute positions in the paper).
  Relative distances between memory and segment tokens are therefore the same in every segment.
- read and write tokens both carry the current memory, as in the public decoder code
  (`[memory; tokens; memory]`), not separate learned write tokens (lucidrains' port).
- decoding: the read tokens enter the segment's decode cache with its first chunk; the write
  tokens run with the chunk that closes the segment, so token-by-token decoding equals
  whole-segment processing (contract suite). No write happens for a segment left unfinished.
- the initial memory is in the no-weight-decay group (like learned token embeddings).
The segment curriculum (1 -> 2 -> 4 ... segments, TrainConfig.curriculum, vary_segments) and
evaluation at longer lengths live in the trainer and the tasks, not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm
from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.learned.config import RMTConfig


@dataclass
class RMTState:
    mem: Tensor     # (B, m, D) the memory written by the last finished segment (graph kept)
    fresh: Tensor   # (B,) bool: nothing written yet in this document -> read the learned initial memory


class RMT(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.EMBED})

    def __init__(self, cfg: RMTConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.init_mem = nn.Parameter(torch.randn(cfg.n_tokens, backbone.d_model) * cfg.init_std)  # (m, D)
        self.norm = RMSNorm(backbone.d_model, backbone.norm_eps)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> RMTState:
        mem = torch.zeros(batch, self.cfg.n_tokens, self.backbone.d_model, device=device, dtype=dtype)
        return RMTState(mem, torch.ones(batch, dtype=torch.bool, device=device))

    def reset(self, state: RMTState, mask: Tensor) -> RMTState:
        return RMTState(state.mem.masked_fill(mask[:, None, None], 0.0), state.fresh | mask)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        fixed = self.cfg.n_tokens * self.backbone.d_model * dtype_bytes(dtype) + 1   # memory + flag
        return MemorySpec(fixed_bytes=fixed, dtype_bytes=dtype_bytes(dtype))

    def memory(self, state: RMTState, dtype: torch.dtype) -> Tensor:
        """The memory this segment reads (B, m, D): the carried one, or the initial one."""
        init = self.init_mem.to(dtype)[None]                                   # (1, m, D)
        return torch.where(state.fresh[:, None, None], init, state.mem.to(dtype))

    def embed_tokens(self, seg_start: bool, seg_end: bool) -> tuple[int, int]:
        m = self.cfg.n_tokens
        return (m if seg_start else 0), (m if seg_end else 0)

    def embed(self, x: Tensor, state: RMTState, ctx: StepContext) -> tuple[Tensor | None, Tensor | None, RMTState]:
        if not (ctx.any_start or ctx.any_end):   # a middle chunk of a segment being decoded
            return None, None, state
        mem = self.memory(state, x.dtype)                                      # (B, m, D)
        return (mem if ctx.any_start else None), (mem if ctx.any_end else None), state

    def embed_out(self, h_prefix: Tensor | None, h_suffix: Tensor | None, state: RMTState, ctx: StepContext) -> RMTState:
        if h_suffix is None:                     # no row finished its segment: nothing written yet
            return state
        new = self.norm(h_suffix).to(state.mem.dtype)                         # (B, m, D)
        if ctx.all_end:
            return RMTState(new, torch.zeros_like(state.fresh))
        end = ctx.seg_end                                                      # only those rows write
        return RMTState(torch.where(end[:, None, None], new, state.mem), state.fresh & ~end)

    def optim_group(self, name: str) -> str | None:
        return "no_decay" if name == "init_mem" else None

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"n_tokens": 4}, {"n_tokens": 1}]
