"""Memory tokens (Memory Transformer, Burtsev et al., arXiv 2006.11527; register tokens).

What it stores: `n_tokens` learned vectors (parameters, not state -- nothing is carried from one
segment to the next).
Read / write: at the start of every segment the tokens are prepended to the input embeddings;
every token of the segment can attend to them (and they to each other, causally). Nothing is
written.

Deviations: the paper's decoder-only variant is followed (memory prepended, causal attention,
so memory tokens cannot see the segment). Their RoPE positions are the P positions just before
the segment's first token, so every segment sees them at the same relative distance. With a
document-scoped KV cache in the stack, each segment's copy of the tokens stays in the cache.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from memstack.config import BackboneConfig
from memstack.memory.base import Memory, Site, StepContext
from memstack.memory.learned.config import MemoryTokensConfig


class MemoryTokens(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.EMBED})

    def __init__(self, cfg: MemoryTokensConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.tokens = nn.Parameter(torch.randn(cfg.n_tokens, backbone.d_model) * cfg.init_std)  # (M, D)

    def embed_tokens(self, seg_start: bool, seg_end: bool) -> tuple[int, int]:
        return (self.cfg.n_tokens if seg_start else 0), 0

    def embed(self, x: Tensor, state: Any, ctx: StepContext) -> tuple[Tensor | None, Tensor | None, Any]:
        if not ctx.any_start:  # later chunks of a segment: the tokens are already in the decode cache
            return None, None, state
        return self.tokens.to(x.dtype).expand(x.shape[0], -1, -1), None, state  # (B, M, D)

    def optim_group(self, name: str) -> str | None:
        return "no_decay"  # learned input vectors: weight decay would pull them to zero

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"n_tokens": 4}]
