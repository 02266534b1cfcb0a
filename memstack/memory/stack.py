"""MemoryStack: several memories in one model, each called at its declared sites.

The stack owns the memory modules and dispatches the backbone's calls to them in list order.
It knows nothing about any family: what a memory does is entirely inside its hooks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from memstack.config import BackboneConfig, MemoryConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext
from memstack.registry import MEMORIES


class MemoryStack(nn.Module):
    def __init__(self, configs: Sequence[MemoryConfig], backbone: BackboneConfig, modules: Sequence[Memory] | None = None):
        super().__init__()
        self.configs = tuple(configs)
        if modules is None:
            modules = [MEMORIES.target_class(c.kind)(c, backbone) for c in self.configs]
        self.memories = nn.ModuleList(modules)
        on = lambda site: [i for i, m in enumerate(self.memories) if site in m.sites]  # noqa: E731
        self._embed, self._attn, self._block, self._logits = (on(s) for s in (Site.EMBED, Site.ATTN, Site.BLOCK, Site.LOGITS))
        self._prepare = [i for i, m in enumerate(self.memories) if type(m).prepare is not Memory.prepare]
        self._attn_at = [[i for i in self._attn if self.memories[i].applies_to(l)] for l in range(backbone.n_layers)]
        self._block_at = [[i for i in self._block if self.memories[i].applies_to(l)] for l in range(backbone.n_layers)]

    @property
    def kinds(self) -> list[str]:
        return [c.kind for c in self.configs]

    def __len__(self) -> int:
        return len(self.memories)

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
        return tuple(m.init_state(batch, device, dtype) for m in self.memories)

    def reset(self, states: tuple[Any, ...], mask: Tensor) -> tuple[Any, ...]:
        return tuple(m.reset(s, mask) for m, s in zip(self.memories, states))

    def specs(self, dtype: torch.dtype = torch.float32) -> list[MemorySpec]:
        return [m.spec(dtype) for m in self.memories]

    def state_bytes(self, n_tokens: int, dtype: torch.dtype = torch.float32) -> int:
        """Logical state bytes per example after n_tokens of one document, over all memories."""
        return sum(s.state_bytes(n_tokens) for s in self.specs(dtype))

    def state_size(self, n_tokens: int, dtype: torch.dtype = torch.float32) -> int:
        return sum(s.state_size(n_tokens) for s in self.specs(dtype))

    # -- sites: `states` is the forward pass's working list, updated in place ------------------
    def prepare(self, states: list[Any], ctx: StepContext) -> None:
        for i in self._prepare:
            self.memories[i].prepare(states[i], ctx)

    def embed(self, x: Tensor, states: list[Any], ctx: StepContext) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int, int, int]]]:
        """Collect prefixes and suffixes. Returns (prefixes, suffixes, spans) where spans[j] =
        (memory index, prefix offset, prefix len, suffix len) in stack order."""
        prefixes, suffixes, spans = [], [], []
        for i in self._embed:
            pre, suf, states[i] = self.memories[i].embed(x, states[i], ctx)
            p = 0 if pre is None else pre.shape[1]
            q = 0 if suf is None else suf.shape[1]
            spans.append((i, sum(t.shape[1] for t in prefixes), p, q))
            if p:
                prefixes.append(pre)
            if q:
                suffixes.append(suf)
        return prefixes, suffixes, spans

    def slots(self, spans: list[tuple[int, int, int, int]], n_prefix: int, n_tokens: int) -> dict[int, tuple[slice, slice]]:
        """id(memory) -> (prefix slice, suffix slice) in the extended chunk (StepContext.embed_slots)."""
        out, suf_at = {}, n_prefix + n_tokens
        for i, off, p, q in spans:
            out[id(self.memories[i])] = (slice(off, off + p), slice(suf_at, suf_at + q))
            suf_at += q
        return out

    def embed_out(self, h: Tensor, spans: list[tuple[int, int, int, int]], states: list[Any], ctx: StepContext) -> None:
        """h (B, P+T+Q, D): hand each EMBED memory the final hidden states of its own slots."""
        suf_at = ctx.n_prefix + ctx.n_tokens
        for i, off, p, q in spans:
            h_pre = h[:, off:off + p] if p else None
            h_suf = h[:, suf_at:suf_at + q] if q else None
            suf_at += q
            states[i] = self.memories[i].embed_out(h_pre, h_suf, states[i], ctx)

    def attn(self, io: AttnIO, states: list[Any], ctx: StepContext) -> list[KVBlock]:
        blocks = []
        for i in self._attn_at[io.layer]:
            blk, states[i] = self.memories[i].attn(io, states[i], ctx)
            if blk is not None:
                blocks.append(blk)
        return blocks

    def attn_out(self, layer: int, q: Tensor, out: Tensor, states: list[Any], ctx: StepContext) -> Tensor:
        for i in self._attn_at[layer]:
            out, states[i] = self.memories[i].attn_out(layer, q, out, states[i], ctx)
        return out

    def block_in(self, layer: int, h: Tensor, states: list[Any], ctx: StepContext) -> Tensor:
        for i in self._block_at[layer]:
            h, states[i] = self.memories[i].block_in(layer, h, states[i], ctx)
        return h

    def block(self, layer: int, h: Tensor, states: list[Any], ctx: StepContext) -> Tensor:
        for i in self._block_at[layer]:
            h, states[i] = self.memories[i].block(layer, h, states[i], ctx)
        return h

    def logits(self, logits: Tensor, h: Tensor, states: list[Any], ctx: StepContext) -> Tensor:
        for i in self._logits:
            logits, states[i] = self.memories[i].logits(logits, h, states[i], ctx)
        return logits
