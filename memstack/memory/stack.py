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

    def take_rows(self, states: tuple[Any, ...], idx: Tensor) -> tuple[Any, ...]:
        return tuple(None if s is None else m.take_rows(s, idx) for m, s in zip(self.memories, states))

    def cat_rows(self, rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        return tuple(None if all(r[i] is None for r in rows) else m.cat_rows([r[i] for r in rows])
                     for i, m in enumerate(self.memories))

    @property
    def adds_tokens(self) -> bool:
        """Some memory puts tokens around the chunk (EMBED)."""
        return bool(self._embed)

    @property
    def changes_logits(self) -> bool:
        """Some memory changes the logits (LOGITS): it reads every position's hidden state."""
        return bool(self._logits)

    @property
    def stateless(self) -> bool:
        """No memory carries state between calls and none adds tokens: a row's output depends on
        its tokens (and the KV cache) only."""
        return not self._embed and all(m.init_state(1, torch.device("cpu"), torch.float32) is None for m in self.memories)

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

    def embed_tokens(self, seg_start: bool, seg_end: bool) -> tuple[int, int]:
        """Prefix and suffix tokens all EMBED memories add to a row with these phases (each must
        declare them: `undeclared_embed` lists those that do not)."""
        P = Q = 0
        for i in self._embed:
            p, q = self.memories[i].embed_tokens(seg_start, seg_end) or (0, 0)
            P, Q = P + p, Q + q
        return P, Q

    def undeclared_embed(self) -> list[str]:
        """EMBED memories that do not declare how many tokens they add (Memory.embed_tokens)."""
        return [type(self.memories[i]).__name__ for i in self._embed
                if self.memories[i].embed_tokens(True, True) is None]

    def _declared_rows(self, i: int, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-row declared (prefix, suffix) counts of EMBED memory i: (p (B,), q (B,)) and, as
        Python ints per phase class, for the checks."""
        m = self.memories[i]
        table = torch.tensor([m.embed_tokens(bool(a), bool(b)) for a in (0, 1) for b in (0, 1)])   # (4, 2)
        cls = ctx.seg_start.long().cpu() * 2 + ctx.seg_end.long().cpu()                        # (B,)
        pq = table[cls]                                                                         # (B, 2)
        return pq[:, 0], pq[:, 1], table[:, 0], table[:, 1]

    def embed(self, x: Tensor, states: list[Any], ctx: StepContext) -> tuple[list[Tensor], list[Tensor], list[tuple]]:
        """Collect prefixes and suffixes. Returns (prefixes, suffixes, spans) where spans[j] =
        (memory index, prefix offset, prefix len, suffix len, prefix rows, suffix rows) in stack
        order; the row masks (B,) bool are None when every row gets the tokens."""
        prefixes, suffixes, spans = [], [], []
        for i in self._embed:
            m = self.memories[i]
            pre, suf, states[i] = m.embed(x, states[i], ctx)
            p = 0 if pre is None else pre.shape[1]
            q = 0 if suf is None else suf.shape[1]
            if m.embed_tokens(True, True) is None:   # undeclared: its tokens are every row's (rows in step)
                spans.append((i, sum(t.shape[1] for t in prefixes), p, q, None, None))
                prefixes += [pre] if p else []
                suffixes += [suf] if q else []
                continue
            dp, dq, _, _ = self._declared_rows(i, ctx)
            rows = []
            for got, want, what in ((p, dp, "prefix"), (q, dq, "suffix")):
                bad = [int(w) for w in want.unique().tolist() if w not in (0, got)]
                if bad or (got and not bool((want == got).any())):
                    raise RuntimeError(f"memory {type(m).__name__} returned a {what} of {got} tokens but declares "
                                       f"{sorted(set(want.tolist()))} for this chunk's rows (Memory.embed_tokens)")
                rows.append(None if not got or bool((want == got).all()) else (want == got).to(x.device))
            spans.append((i, sum(t.shape[1] for t in prefixes), p, q, rows[0], rows[1]))
            if p:
                prefixes.append(pre)
            if q:
                suffixes.append(suf)
        return prefixes, suffixes, spans

    def token_valid(self, spans: list[tuple], n_prefix: int, n_tokens: int, batch: int, device) -> Tensor | None:
        """(B, P+T+Q) bool validity of the extended chunk, or None when every token is valid."""
        if all(s[4] is None and s[5] is None for s in spans):
            return None
        n_suf = sum(s[3] for s in spans)
        valid = torch.ones(batch, n_prefix + n_tokens + n_suf, dtype=torch.bool, device=device)
        suf_at = n_prefix + n_tokens
        for _, off, p, q, pre_rows, suf_rows in spans:
            if pre_rows is not None:
                valid[:, off:off + p] = pre_rows[:, None]
            if suf_rows is not None:
                valid[:, suf_at:suf_at + q] = suf_rows[:, None]
            suf_at += q
        return valid

    def slots(self, spans: list[tuple], n_prefix: int, n_tokens: int) -> dict[int, tuple[slice, slice]]:
        """id(memory) -> (prefix slice, suffix slice) in the extended chunk (StepContext.embed_slots)."""
        out, suf_at = {}, n_prefix + n_tokens
        for i, off, p, q, *_ in spans:
            out[id(self.memories[i])] = (slice(off, off + p), slice(suf_at, suf_at + q))
            suf_at += q
        return out

    def embed_out(self, h: Tensor, spans: list[tuple[int, int, int, int]], states: list[Any], ctx: StepContext) -> None:
        """h (B, P+T+Q, D): hand each EMBED memory the final hidden states of its own slots."""
        suf_at = ctx.n_prefix + ctx.n_tokens
        for i, off, p, q, *_ in spans:
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
