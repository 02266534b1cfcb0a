"""Associative Recurrent Memory Transformer (Rodkin et al., arXiv 2407.04841).

What it stores: for every memory layer l an association matrix A_l (d_key x D) and a normaliser
z_l (d_key), fp32, d_key = 2 * nu * d_mem; nothing else is carried between segments.
Write tokens: m learned vectors (parameters, the same every segment) appended to each segment;
under causal attention they see the whole segment.
Read (before every memory layer, every token, BLOCK site `block_in`):
    h <- h + phi(W_q h) A_l / (phi(W_q h) . z_l + eps)
Write (after every memory layer, from the write tokens' outputs w of that layer, BLOCK `block`):
    k = phi(W_k w), v = W_v w, beta = sigmoid(W_b w)         (one per write token)
    v <- v - k A_l / (k . z_l + eps)                          (delta rule: store only what is new)
    A_l <- A_l + sum beta k^T v
    z_l <- z_l + sum gamma k,  gamma = clip(1 - k . z_l / |k|^2, 0, 1), detached
phi is DPFP (Schlag et al. 2021) of order nu followed by L2 normalisation. W_v starts at zero,
so a fresh model reads nothing and equals its backbone. The reads and the write are the
associative-memory op (ops/linear_memory: `memory_read`, and `linear_memory` with one block
= the write tokens, rule "delta", z_rule "new_info"), in fp32 with autocast off.
Gradients: A and z keep their graph, so the BPTT policy of the trainer applies (the paper trains
with full BPTT).

Deviations from the paper / public code:
- state is explicit (A, z per layer in the state), not module attributes reset by `zero_mem`.
- the first segment reads an all-zero memory (0 / (0 + eps) = 0) instead of skipping the read,
  which gives the same output; writes use the same formula (with A = z = 0: v unchanged, gamma ~ 1).
- the write tokens get RoPE positions just after the segment (the public code re-indexes them);
  the memory itself is position-free.
- memory layers default to all layers; `layers` selects a subset.
- decoding: the write runs with the chunk that closes a segment; reads in earlier chunks use
  the segment-start memory, as whole-segment processing does (contract suite).
- beta has a bias (initialised 0, beta = 0.5); W_q, W_k, W_v have none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext
from memstack.memory.learned.config import ARMTConfig
from memstack.ops.linear_memory import linear_memory, memory_read


def dpfp(x: Tensor, nu: int) -> Tensor:
    """Deterministic parameter-free projection (Schlag et al., arXiv 2102.11174): (..., d) -> (..., 2*nu*d), >= 0."""
    r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)                          # (..., 2d)
    rolled = torch.cat([r.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    return r.repeat(*([1] * (r.dim() - 1)), nu) * rolled                    # (..., 2*nu*d)


def _f32(lin: nn.Linear, x: Tensor) -> Tensor:
    """lin(x) in fp32 whatever the parameters' dtype (the memory is computed in fp32)."""
    return F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())


@dataclass
class ARMTState:
    A: tuple[Tensor, ...]   # per memory layer (B, d_key, D) fp32
    z: tuple[Tensor, ...]   # per memory layer (B, d_key) fp32


class ARMT(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.EMBED, Site.BLOCK})

    def __init__(self, cfg: ARMTConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D = backbone.d_model
        self.mem_layers = [l for l in range(backbone.n_layers) if self.applies_to(l)]
        self.slot = {l: i for i, l in enumerate(self.mem_layers)}
        self.d_key = 2 * cfg.nu * cfg.d_mem
        self.tokens = nn.Parameter(torch.randn(cfg.n_tokens, D) * cfg.init_std)    # (m, D) write tokens
        n = len(self.mem_layers)
        self.w_q = nn.ModuleList(nn.Linear(D, cfg.d_mem, bias=False) for _ in range(n))
        self.w_k = nn.ModuleList(nn.Linear(D, cfg.d_mem, bias=False) for _ in range(n))
        self.w_v = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(n))
        self.w_b = nn.ModuleList(nn.Linear(D, 1) for _ in range(n))
        for lin in list(self.w_q) + list(self.w_k):
            nn.init.normal_(lin.weight, 0.0, backbone.init_std)
        for lin in self.w_v:
            nn.init.zeros_(lin.weight)              # reads nothing at first: starts as the backbone
        for lin in self.w_b:
            nn.init.normal_(lin.weight, 0.0, backbone.init_std)
            nn.init.zeros_(lin.bias)

    # -- state -----------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ARMTState:
        n, dk, D = len(self.mem_layers), self.d_key, self.backbone.d_model
        return ARMTState(tuple(torch.zeros(batch, dk, D, device=device) for _ in range(n)),
                         tuple(torch.zeros(batch, dk, device=device) for _ in range(n)))

    def reset(self, state: ARMTState, mask: Tensor) -> ARMTState:
        return ARMTState(tuple(a.masked_fill(mask[:, None, None], 0.0) for a in state.A),
                         tuple(z.masked_fill(mask[:, None], 0.0) for z in state.z))

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        per_layer = (self.d_key * self.backbone.d_model + self.d_key) * 4          # fp32 whatever the model runs in
        return MemorySpec(fixed_bytes=len(self.mem_layers) * per_layer, dtype_bytes=4)

    # -- sites -----------------------------------------------------------------------------------
    def embed_tokens(self, seg_start: bool, seg_end: bool) -> tuple[int, int]:
        return 0, (self.cfg.n_tokens if seg_end else 0)

    def embed(self, x: Tensor, state: ARMTState, ctx: StepContext) -> tuple[Tensor | None, Tensor | None, ARMTState]:
        if not ctx.any_end:
            return None, None, state
        return None, self.tokens.to(x.dtype).expand(x.shape[0], -1, -1), state     # (B, m, D)

    def _phi(self, x: Tensor) -> Tensor:
        return F.normalize(dpfp(x, self.cfg.nu), dim=-1)


    def block_in(self, layer: int, h: Tensor, state: ARMTState, ctx: StepContext) -> tuple[Tensor, ARMTState]:
        j = self.slot[layer]
        with torch.autocast(h.device.type, enabled=False):
            q = self._phi(_f32(self.w_q[j], h))                                     # (B, T', d_key)
            read = memory_read(q[:, None], state.A[j][:, None], state.z[j][:, None], self.cfg.eps)[:, 0]  # (B, T', D)
        return h + read.to(h.dtype), state

    def block(self, layer: int, h: Tensor, state: ARMTState, ctx: StepContext) -> tuple[Tensor, ARMTState]:
        _, suf = ctx.slots_of(self)
        if suf.stop == suf.start:                    # no write tokens in this chunk
            return h, state
        j = self.slot[layer]
        with torch.autocast(h.device.type, enabled=False):
            w = h[:, suf].float()                                                   # (B, m, D)
            k = self._phi(_f32(self.w_k[j], w))[:, None]                            # (B, 1, m, d_key)
            v = _f32(self.w_v[j], w)[:, None]                                       # (B, 1, m, D)
            beta = torch.sigmoid(_f32(self.w_b[j], w))[..., 0][:, None]             # (B, 1, m)
            _, dA, dz = linear_memory(k, k, v, state.A[j][:, None], state.z[j][:, None], beta, rule="delta",
                                      z_rule="new_info" if self.cfg.correction else "sum", eps=self.cfg.eps)
        A, z = list(state.A), list(state.z)
        if ctx.all_end:
            A[j], z[j] = state.A[j] + dA[:, 0], state.z[j] + dz[:, 0]
        else:  # only the rows that closed a segment have write tokens
            end = ctx.seg_end
            A[j] = torch.where(end[:, None, None], state.A[j] + dA[:, 0], state.A[j])
            z[j] = torch.where(end[:, None], state.z[j] + dz[:, 0], state.z[j])
        return h, ARMTState(tuple(A), tuple(z))

    def make_identity(self) -> bool:
        with torch.no_grad():
            for lin in self.w_v:
                lin.weight.zero_()
        return True

    def optim_group(self, name: str) -> str | None:
        return "no_decay" if name == "tokens" else None

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"n_tokens": 2, "d_mem": 4, "nu": 3}, {"n_tokens": 1, "d_mem": 3, "nu": 1, "correction": False, "layers": [1]}]
