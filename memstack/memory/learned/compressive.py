"""Compressive Transformer (Rae et al., arXiv 1911.05507).

What it stores, per layer with memory:
- the Transformer-XL memory (memory/learned/xl.py, reused as is): stop-gradient hidden states of
  the last `mem_len` tokens, FIFO;
- a compressed memory of `cmem_len` slots, FIFO: when the XL memory evicts states at a segment
  end, every group of `rate` consecutive evicted states becomes one compressed slot
  f_c(group) -> R^D, pushed into the compressed memory (whose oldest slots fall off).
Read: layer n attends over [K/V(cmem_n); K/V(mem_n); segment]; both memories hold hidden states
and are re-projected with the layer's current norm, K/V projections and RoPE, as in XL.
Temporal range ~ mem_len + rate * cmem_len tokens for the attention cost of mem_len + cmem_len.

Compression functions f_c (`compression`):
- "mean" / "max": pooling with kernel = stride = rate;
- "conv": a per-layer 1-D convolution over time, kernel = stride = rate (D -> D channels);
- "dilated_conv": a per-layer stack of dilated kernel-2 convolutions reading exactly each group
  (memory/learned/dilated.py; trained like "conv" by the reconstruction loss);
- "most_used": keep the rate-th most attended evicted states (see deviations), in time order.

Training (as the paper): the compressed memory is stored stop-gradient, so the language-model
loss never reaches f_c. The conv compressor is trained only by the attention-reconstruction
loss, added through `ctx.add_loss("compressive_recon", recon_weight * L)`:
    L = mean || attn(q, old) - attn(q, f_c(old)) ||^2
with q the current segment's queries at this layer and `old` the states being evicted; the
queries, the evicted states and the attention's projection weights are all stop-gradient, so L
trains f_c and nothing else. Implementation of that stop-gradient: the layer's K/V projection is
a closure (AttnIO.project_kv), so we take dL/dc with `torch.autograd.grad` w.r.t. a detached copy
of c = f_c(old) and add the surrogate `(c * dL/dc).sum()` (value shifted to read L), whose only
gradient is dL/d(f_c's parameters). Pooling and most-used have no parameters, so no loss.

Deviations from the paper:
- positions: RoPE instead of XL's relative sinusoids (see xl.py). A compressed slot is placed at
  the mean position of its group (floor); a most-used slot keeps its token's position.
- the queries of the reconstruction loss are those of the chunk that closes the segment (the
  whole segment in training; the loss is only computed in training, with gradients on).
- "most_used" ranks evicted states by the attention they received while in memory, summed over
  segments, heads and queries, where each query's attention is a softmax over the *memory slots
  only* (not over the segment and other memories): that share is the same whether a segment
  arrives whole or token by token, which the full softmax (its denominator includes the
  segment's keys, held by the decode cache) is not. Ties of usage between states evicted in the
  same segment are broken by time (the paper does not say).
- the conv starts as mean pooling (weight 1/rate on each channel's own input, bias 0); the paper
  does not give its initialisation.
- the compressed memory is a fixed buffer of cmem_len slots (invalid until filled), so its state
  size does not depend on the context; `MemorySpec.fixed_bytes` counts it.
- seg_len and mem_len must be multiples of rate so every evicted state lands in a whole group;
  if a segment shorter than seg_len closes, the oldest E mod rate evicted states are dropped.
- a compressed slot is valid only if every state of its group is (groups never straddle a
  document boundary when segments are whole).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, MemorySpec, Site, StepContext, dtype_bytes
from memstack.memory.learned.config import CompressiveConfig
from memstack.memory.learned.dilated import DilatedCompressor
from memstack.memory.learned.xl import Evicted, TransformerXL, XLState
from memstack.memory.state import compact_index, gather_entries
from memstack.ops.attention import attention


@dataclass
class CompressiveState:
    xl: XLState                    # the Transformer-XL memory (see xl.py)
    cmem: tuple[Tensor, ...]       # per memory layer (B, Nc, D), detached; Nc = cmem_len (fixed buffer)
    cpos: Tensor                   # (B, Nc) int64 positions of the compressed slots
    cvalid: Tensor                 # (B, Nc) bool
    usage: tuple[Tensor, ...]      # most_used only: per memory layer (B, M) fp32 attention received; else ()


class Compressive(TransformerXL):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: CompressiveConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D, r = backbone.d_model, cfg.rate
        self.conv = None
        if cfg.compression == "conv":
            self.conv = nn.ModuleList(nn.Conv1d(D, D, kernel_size=r, stride=r) for _ in self.mem_layers)
            with torch.no_grad():
                for c in self.conv:  # start as mean pooling
                    c.weight.zero_()
                    c.weight[torch.arange(D), torch.arange(D)] = 1.0 / r      # (D_out, D_in, r)
                    c.bias.zero_()
        elif cfg.compression == "dilated_conv":  # same (B, D, E) -> (B, D, E/rate) interface as the conv
            self.conv = nn.ModuleList(DilatedCompressor(D, r) for _ in self.mem_layers)

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> CompressiveState:
        Nc, D = self.cfg.cmem_len, self.backbone.d_model
        usage = tuple(torch.zeros(batch, 0, device=device) for _ in self.mem_layers) if self._most_used else ()
        return CompressiveState(super().init_state(batch, device, dtype),
                                tuple(torch.zeros(batch, Nc, D, device=device, dtype=dtype) for _ in self.mem_layers),
                                torch.zeros(batch, Nc, dtype=torch.long, device=device),
                                torch.zeros(batch, Nc, dtype=torch.bool, device=device), usage)

    def reset(self, state: CompressiveState, mask: Tensor) -> CompressiveState:
        usage = tuple(u.masked_fill(mask[:, None], 0.0) for u in state.usage)
        return CompressiveState(super().reset(state.xl, mask), state.cmem, state.cpos, state.cvalid & ~mask[:, None], usage)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        L, D, db, Nc = len(self.mem_layers), self.backbone.d_model, dtype_bytes(dtype), self.cfg.cmem_len
        per_tok = L * D * db + 8 + 1 + (4 * L if self._most_used else 0)   # states, pos, valid (, usage)
        fixed = L * Nc * D * db + Nc * (8 + 1)                               # compressed buffer, pos, valid
        return MemorySpec(bytes_per_token=per_tok, fixed_bytes=fixed, max_tokens=self.cfg.mem_len, dtype_bytes=db)

    @property
    def _most_used(self) -> bool:
        return self.cfg.compression == "most_used"

    # -- the ATTN site ---------------------------------------------------------------------------
    def attn(self, io: AttnIO, state: CompressiveState, ctx: StepContext) -> tuple[KVBlock | None, CompressiveState]:
        j = self.slot[io.layer]
        kc, vc = io.project_kv(state.cmem[j], state.cpos)             # (B, Hkv, Nc, hd)
        mem_block = self.read(io, state.xl)
        if mem_block is None:
            block = KVBlock(kc, vc, state.cvalid)
        else:
            block = KVBlock(torch.cat([kc, mem_block.k], 2), torch.cat([vc, mem_block.v], 2),
                            torch.cat([state.cvalid, mem_block.valid], 1))
        usage = list(state.usage)
        if self._most_used and mem_block is not None:
            usage[j] = state.usage[j] + self._usage(io.q[:, :, ctx.real], mem_block)
        xl, ev, mem_idx = self.write(io, state.xl, ctx)
        cmem, cpos, cvalid = list(state.cmem), state.cpos, state.cvalid
        ev_usage = None
        if mem_idx is not None and self._most_used:  # usage follows the FIFO: new slots start at 0
            Tp = (0 if ctx.all_start else state.xl.pending[j].shape[1]) + ctx.n_tokens   # see segment_so_far
            full = torch.cat([usage[j], usage[j].new_zeros(usage[j].shape[0], Tp)], 1)
            usage[j] = gather_entries(full, mem_idx)
            if ev is not None:
                ev_usage = gather_entries(full, ev.idx)
        if ev is not None:
            grouped = self._groups(ev, ev_usage)
            if grouped is not None:
                ev, ev_usage = grouped
                c, c_pos, c_valid = self.compress(j, ev, ev_usage)
                if self.conv is not None and ctx.training and torch.is_grad_enabled() and self.cfg.recon_weight > 0:
                    loss = self._recon_loss(io, ev, c, c_pos, c_valid, ctx)
                    ctx.add_loss("compressive_recon", self.cfg.recon_weight * loss)
                # the newest cmem_len valid slots, in a buffer of exactly cmem_len (stop-gradient)
                idx, ok = compact_index(torch.cat([state.cvalid, c_valid], 1), self.cfg.cmem_len, width=self.cfg.cmem_len)
                cmem[j] = gather_entries(torch.cat([state.cmem[j], c.detach()], 1), idx)
                if j == len(self.mem_layers) - 1:  # shared bookkeeping, once at the last memory layer
                    cpos, cvalid = gather_entries(torch.cat([state.cpos, c_pos], 1), idx), ok
        elif self.conv is not None and ctx.training and torch.is_grad_enabled() and j == 0 and ctx.any_end:
            # nothing evicted yet: a zero loss touching the compressor keeps DDP's gradient
            # reduction complete (every parameter takes part in every step)
            ctx.add_loss("compressive_recon", sum(p.sum() for p in self.conv.parameters()) * 0.0)
        return block, CompressiveState(xl, tuple(cmem), cpos, cvalid, tuple(usage))

    def _groups(self, ev: Evicted, usage: Tensor | None) -> tuple[Evicted, Tensor | None] | None:
        """Each row's evicted states (oldest first), less its oldest E mod rate ones, so that the
        rest falls in whole groups of `rate`; None when no row has a whole group."""
        r = self.cfg.rate
        n = ev.valid.sum(1)                                               # (B,)
        if not bool((n >= r).any()):
            return None
        rank = ev.valid.long().cumsum(1) - 1
        use = ev.valid & (rank >= (n % r)[:, None])
        idx, ok = compact_index(use, left=True)
        W = -(-idx.shape[1] // r) * r
        if W > idx.shape[1]:
            idx, ok = compact_index(use, left=True, width=W)
        out = Evicted(gather_entries(ev.h, idx), gather_entries(ev.pos, idx), ok)
        return out, (gather_entries(usage, idx) if usage is not None else None)

    # -- compression ---------------------------------------------------------------------------
    def compress(self, j: int, ev: Evicted, usage: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """f_c of layer slot j: evicted states (B, E, D), E a multiple of rate ->
        (compressed (B, E/rate, D), positions (B, E/rate), valid (B, E/rate))."""
        B, E, D = ev.h.shape
        r, n = self.cfg.rate, E // self.cfg.rate
        kind = self.cfg.compression
        if kind == "most_used":
            # the n most attended states (of each row's valid ones), kept in time order; ties go
            # to the earlier state
            score = usage.float().masked_fill(~ev.valid, float("-inf"))
            top = torch.topk(score, n, dim=1, sorted=True).indices                      # (B, n) best first
            want = (ev.valid.sum(1) // r)[:, None]                                     # a row keeps E_r / rate
            keep = torch.arange(n, device=top.device)[None] < want
            order = torch.where(keep, top, top + E).sort(dim=1)                         # kept ones first, in time order
            idx = order.values % E if E else order.values
            ok = order.values < E
            h = torch.gather(ev.h, 1, idx[..., None].expand(B, n, D))
            return h, torch.gather(ev.pos, 1, idx), torch.gather(ev.valid, 1, idx) & ok
        groups = ev.h.reshape(B, n, r, D)
        if kind == "mean":
            h = groups.mean(2)
        elif kind == "max":
            h = groups.amax(2)
        else:
            h = self.conv[j](ev.h.transpose(1, 2)).transpose(1, 2)          # (B, n, D)
        pos = ev.pos.reshape(B, n, r).sum(2).div(r, rounding_mode="floor")
        return h, pos, ev.valid.reshape(B, n, r).all(2)

    def _usage(self, q: Tensor, mem_block: KVBlock) -> Tensor:
        """Attention each memory slot receives from the chunk's queries q (B, H, T, hd), as a
        softmax over the memory slots only; summed over heads and queries -> (B, M) fp32."""
        with torch.no_grad():
            q, k = q.float(), mem_block.k.float()
            g = q.shape[1] // k.shape[1]
            scores = q @ k.repeat_interleave(g, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])   # (B, H, T, M)
            scores = scores.masked_fill(~mem_block.valid[:, None, None, :], float("-inf"))
            p = torch.softmax(scores, -1).nan_to_num(0.0)                   # rows with no valid slot: 0
            return p.sum(dim=(1, 2))

    def _recon_loss(self, io: AttnIO, ev: Evicted, c: Tensor, c_pos: Tensor, c_valid: Tensor, ctx: StepContext) -> Tensor:
        """Attention-reconstruction loss, differentiable w.r.t. the compressor's parameters only."""
        q = io.q[:, :, ctx.real].detach()                                   # (B, H, T, hd)
        B, T = q.shape[0], q.shape[2]
        rows = ev.valid.any(1) & c_valid.any(1)                             # (B,) rows with something to compare
        full = lambda valid: (valid | ~rows[:, None])[:, None, :].expand(B, T, valid.shape[1])  # noqa: E731
        with torch.no_grad():
            k, v = io.project_kv(ev.h, ev.pos)                              # (B, Hkv, E, hd)
            target = attention(q, k, v, full(ev.valid))                     # (B, H, T, hd)
        leaf = c.detach().requires_grad_(True)
        with torch.enable_grad():
            kc, vc = io.project_kv(leaf, c_pos)                             # (B, Hkv, E/rate, hd)
            pred = attention(q, kc, vc, full(c_valid))
            err = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))   # (B,)
            loss = (err * rows).sum() / rows.sum().clamp(min=1)
            (grad,) = torch.autograd.grad(loss, leaf)                       # dL/dc, nothing else
        surrogate = (c * grad).sum()
        return loss.detach() + surrogate - surrogate.detach()              # value L, gradient dL/dtheta_fc

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"mem_len": 16, "cmem_len": 8, "rate": 4, "compression": "conv"},
                {"mem_len": 8, "cmem_len": 6, "rate": 2, "compression": "mean", "layers": [1]},
                {"mem_len": 16, "cmem_len": 4, "rate": 4, "compression": "max"},
                {"mem_len": 16, "cmem_len": 8, "rate": 4, "compression": "most_used"},
                {"mem_len": 16, "cmem_len": 4, "rate": 4, "compression": "dilated_conv"}]
