"""The model runner: one forward pass over a packed step of many requests, K/V in paged blocks.

A step is a list of (request, n new tokens). Their tokens are packed into one (1, N) sequence
(no padding); each token has its document position (RoPE) and a physical slot in the pool.
Per layer: project q/k/v with the backbone's own modules, write k/v into the slots, then attend:
- requests with one new token (decode) together, through `paged_decode` (the Triton kernel on
  a GPU) -- K/V read in place through the block tables;
- each prefill chunk through `paged_prefill`: its visible slots gathered, then SDPA, causal.
Only the backbone is run (tok_emb, blocks, norm, lm_head): the engine serves KV-only models
(engine/policy.py), and their KV cache memory is replaced by the pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memstack.backbone.layers import rope_tables
from memstack.memory.kv.store import PagedKVCache
from memstack.ops.paged_attention import paged_decode, paged_prefill


@dataclass
class Work:
    """One request's share of a step."""

    tokens: list[int]          # the new tokens
    pos0: int                  # document position of tokens[0]
    slot0: int                 # slot of tokens[0] in the sequence's block table
    start: int                 # first visible slot
    block_ids: list[int]       # the sequence's block table

    @property
    def n(self) -> int:
        return len(self.tokens)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.bs = cache.spec.block_size
        b = model.cfg.backbone
        self.head_dim, self.theta = b.head_dim, b.rope_theta

    @torch.no_grad()
    def run(self, work: list[Work], all_logits: bool = False) -> Tensor | list[Tensor]:
        """Logits (n_work, V) after each request's last new token (fp32), or with all_logits a
        list of (n, V) per request."""
        m, dev, bs = self.model, self.cache.device, self.bs
        toks = torch.tensor([t for w in work for t in w.tokens], dtype=torch.long, device=dev)
        pos = torch.tensor([w.pos0 + i for w in work for i in range(w.n)], device=dev)
        slots = torch.tensor([w.block_ids[(w.slot0 + i) // bs] * bs + (w.slot0 + i) % bs
                              for w in work for i in range(w.n)], device=dev)
        offs = [0]
        for w in work:
            offs.append(offs[-1] + w.n)
        dec = [i for i, w in enumerate(work) if w.n == 1]
        pre = [i for i, w in enumerate(work) if w.n > 1]
        if dec:
            dec_rows = torch.tensor([offs[i] for i in dec], device=dev)
            width = max(len(work[i].block_ids) for i in dec)
            tables = torch.zeros(len(dec), width, dtype=torch.int32, device=dev)
            for r, i in enumerate(dec):
                tables[r, :len(work[i].block_ids)] = torch.tensor(work[i].block_ids, dtype=torch.int32)
            starts = torch.tensor([work[i].start for i in dec], device=dev)
            lens = torch.tensor([work[i].slot0 + 1 for i in dec], device=dev)
        pre_tables = {i: torch.tensor(work[i].block_ids, device=dev) for i in pre}

        h = m.tok_emb(toks)[None]                                                # (1, N, D)
        cos, sin = rope_tables(pos[None], self.head_dim, self.theta, h.dtype)
        for l, blk in enumerate(m.blocks):
            x = blk.attn_norm(h)
            q = blk.attn.q(x, cos, sin)[0].transpose(0, 1)                       # (N, H, hd)
            k, v = blk.attn.kv(x, cos, sin)                                      # (1, Hkv, N, hd)
            self.cache.write(l, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            kc, vc = self.cache.layer(l)
            o = torch.empty_like(q)                                              # (N, H, hd)
            if dec:
                o[dec_rows] = paged_decode(q[dec_rows], kc, vc, tables, starts, lens)
            for i in pre:
                w = work[i]
                o[offs[i]:offs[i + 1]] = paged_prefill(q[offs[i]:offs[i + 1]], kc, vc, pre_tables[i], w.start,
                                                       w.slot0 + w.n)
            h = h + blk.attn.wo(o.reshape(1, o.shape[0], -1))
            h = h + blk.mlp(blk.mlp_norm(h))
        if all_logits:
            out = m.lm_head(m.norm(h[0])).float()                                # (N, V)
            return [out[offs[i]:offs[i + 1]] for i in range(len(work))]
        last = torch.tensor([o - 1 for o in offs[1:]], device=dev)
        return m.lm_head(m.norm(h[0, last])).float()                             # (n_work, V)
