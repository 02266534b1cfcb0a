"""Hierarchical Memory Transformer (He et al., arXiv 2405.06067, NAACL 2025).

What it stores, per example:
- sensory memory: the input embeddings of the last k tokens of the previous segment (`tail`);
- long-term memory: a FIFO cache of the last N memory embeddings (one per finished segment);
- the memory embedding of the current segment (`cur`, kept while a segment is decoded in chunks).
How a segment is processed (EMBED site):
1. summary: the backbone itself (`StepContext.encode`, no memory attached) runs over
   [s; the last j tokens of the previous segment; s] (s a learned summary token); the normalised
   output at the last position is the summary S.
2. recall: cross-attention of S over the cache, P = softmax(S W_q (C W_k)^T / sqrt(d)) C, with C
   the cached memory embeddings; with an empty cache, P is a learned initial memory.
3. the segment is processed as [P; sensory (k embeddings); segment; P] (read token, sensory
   tokens, the segment, write token -- RMT's layout with one memory token);
4. write: the write token's final hidden state, normalised, is the segment's memory embedding;
   it is pushed into the cache.
Gradients: every part of the state keeps its graph (BPTT as the trainer's policy allows).

Deviations from the paper / public code:
- CAUSAL summary. The paper summarises the first half of the *current* segment and uses the
  recalled memory to predict the tokens of that same segment, so tokens of the first half can
  be predicted with a summary that has already read them (a look-ahead through the recall
  weights; also impossible to decode token by token). Here the summary reads the last `n_summary`
  tokens of the *previous* segment, so every prediction sees only the past, and token-by-token
  decoding equals whole-segment processing (contract suite). A consequence: recall is keyed on
  the recent past, not on the segment it serves (a query at the start of a segment cannot steer
  its own recall).
- the first segment of a document reads k zero vectors in place of the (absent) sensory memory,
  so every row of a batch has the same layout.
- one training stage (the paper trains RMT + sensory memory first, then adds recall); no LoRA;
  no "browsing" of extra tokens at test time; no retrieval loss.
- memory embeddings are normalised by this memory's RMSNorm (the public code reads the backbone's
  post-final-norm hidden states; our EMBED site hands over the pre-norm stream).
- positions: RoPE at document positions; the summary pass uses positions 0..j+1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm
from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.learned.config import HMTConfig


@dataclass
class HMTState:
    tail: Tensor       # (B, W, D) input embeddings of the last W tokens seen (zeros: none yet), W = max(k, j)
    cache: Tensor      # (B, N, D) past memory embeddings, oldest first
    valid: Tensor      # (B, N) bool
    cur: Tensor        # (B, 1, D) this segment's memory token (read at its start, written at its end)


def _keep_last(x: Tensor, n: int) -> Tensor:
    return x[:, -n:].clone() if x.shape[1] > n else x


class HMT(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.EMBED})

    def __init__(self, cfg: HMTConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D = backbone.d_model
        self.W = max(cfg.n_sensory, cfg.n_summary)
        self.d_recall = cfg.d_recall or D
        self.init_mem = nn.Parameter(torch.randn(1, D) * cfg.init_std)       # memory of the first segment
        self.sum_token = nn.Parameter(torch.randn(1, D) * cfg.init_std)      # s, the summary query token
        self.w_q = nn.Linear(D, self.d_recall, bias=False)
        self.w_k = nn.Linear(D, self.d_recall, bias=False)
        for lin in (self.w_q, self.w_k):
            nn.init.normal_(lin.weight, 0.0, backbone.init_std)
        self.norm_mem = RMSNorm(D, backbone.norm_eps)
        self.norm_sum = RMSNorm(D, backbone.norm_eps)

    # -- state -----------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> HMTState:
        D, N = self.backbone.d_model, self.cfg.cache_size
        zeros = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        no = lambda *s: torch.zeros(*s, device=device, dtype=torch.bool)  # noqa: E731
        return HMTState(zeros(batch, self.W, D), zeros(batch, N, D), no(batch, N), zeros(batch, 1, D))

    def reset(self, state: HMTState, mask: Tensor) -> HMTState:
        m3 = mask[:, None, None]
        return HMTState(state.tail.masked_fill(m3, 0.0), state.cache.masked_fill(m3, 0.0),
                        state.valid & ~mask[:, None], state.cur.masked_fill(m3, 0.0))

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        D, N, e = self.backbone.d_model, self.cfg.cache_size, dtype_bytes(dtype)
        fixed = (self.W + N + 1) * D * e + N          # tail, cache, cur; the cache's valid flags
        return MemorySpec(fixed_bytes=fixed, dtype_bytes=e)

    # -- the three levels ------------------------------------------------------------------------
    def _summary(self, tail: Tensor, ctx: StepContext) -> Tensor:
        """S (B, D): the backbone's reading of [s; last n_summary tokens of the previous segment; s]."""
        if ctx.encode is None:
            raise RuntimeError("HMT needs StepContext.encode (the backbone) to summarise a segment; run it inside a model")
        B, D = tail.shape[0], tail.shape[2]
        s = self.sum_token.to(tail.dtype).expand(B, 1, D)
        x = torch.cat([s, tail[:, tail.shape[1] - self.cfg.n_summary:], s], dim=1)  # (B, j+2, D)
        pos = torch.arange(x.shape[1], device=x.device).expand(B, -1)
        return self.norm_sum(ctx.encode(x, pos)[:, -1])                              # (B, D)

    def _recall(self, summary: Tensor, state: HMTState) -> Tensor:
        """P (B, 1, D): cross-attention of the summary over the cached memory embeddings."""
        q = self.w_q(summary)[:, None]                                               # (B, 1, d)
        k = self.w_k(state.cache)                                                    # (B, N, d)
        scores = (q @ k.transpose(1, 2)).float() / math.sqrt(self.d_recall)          # (B, 1, N)
        scores = scores.masked_fill(~state.valid[:, None], -1e9)                     # finite: no NaN rows
        w = torch.softmax(scores, dim=-1).to(state.cache.dtype)
        return w @ state.cache                                                       # (B, 1, D)

    def embed_tokens(self, seg_start: bool, seg_end: bool) -> tuple[int, int]:
        return (1 + self.cfg.n_sensory if seg_start else 0), (1 if seg_end else 0)

    def embed(self, x: Tensor, state: HMTState, ctx: StepContext) -> tuple[Tensor | None, Tensor | None, HMTState]:
        B, _, D = x.shape
        tail, cur = state.tail, state.cur
        prefix = None
        if ctx.any_start:
            init = self.init_mem.to(x.dtype).expand(B, 1, D)
            start = ctx.seg_start
            if bool((state.valid.any(1) & start).any()):   # some starting row has something to recall
                recalled = self._recall(self._summary(tail.to(x.dtype), ctx), state)
                new = torch.where(state.valid.any(1)[:, None, None], recalled.to(x.dtype), init)
            else:
                new = init
            cur = new if ctx.all_start else torch.where(start[:, None, None], new, cur.to(x.dtype))
            sensory = tail[:, self.W - self.cfg.n_sensory:].to(x.dtype)              # (B, k, D), zeros if no prev
            prefix = torch.cat([cur, sensory], dim=1)                                # (B, 1 + k, D)
        tail = _keep_last(torch.cat([tail, x.to(tail.dtype)], dim=1), self.W)
        suffix = cur if ctx.any_end else None
        return prefix, suffix, HMTState(tail, state.cache, state.valid, cur)

    def embed_out(self, h_prefix: Tensor | None, h_suffix: Tensor | None, state: HMTState, ctx: StepContext) -> HMTState:
        if h_suffix is None:
            return state
        new = self.norm_mem(h_suffix).to(state.cache.dtype)                          # (B, 1, D)
        cache = torch.cat([state.cache[:, 1:], new], dim=1)                          # FIFO (B, N, D)
        valid = torch.cat([state.valid[:, 1:], torch.ones_like(state.valid[:, :1])], dim=1)
        if not ctx.all_end:                                                          # only rows that closed a segment
            end = ctx.seg_end
            cache = torch.where(end[:, None, None], cache, state.cache)
            valid = torch.where(end[:, None], valid, state.valid)
        return HMTState(state.tail, cache, valid, state.cur)

    def optim_group(self, name: str) -> str | None:
        return "no_decay" if name in ("init_mem", "sum_token") else None

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"n_sensory": 4, "n_summary": 6, "cache_size": 3}, {"n_sensory": 0, "n_summary": 2, "cache_size": 2}]
