"""Infini-attention (Munkhdalai et al., arXiv 2404.07143).

What it stores: for every memory layer and KV head a compressive memory M (head_dim x head_dim)
and a normaliser z (head_dim), fp32 -- constant size whatever the context length.
Read (every query of the chunk, ATTN site): with sigma = ELU + 1 on the layer's own queries and
keys (no new projections),
    A_mem = sigma(Q) M / (sigma(Q) z + eps)
mixed with the local (in-segment, causal softmax) attention output by a learned per-head gate:
    A = sigmoid(g) A_mem + (1 - sigmoid(g)) A_local,       g initialised to `gate_init` (-3: local)
Write (the segment's real tokens, once the segment is finished):
    linear: M <- M + sigma(K)^T V
    delta:  M <- M + sigma(K)^T (V - sigma(K) M / (sigma(K) z + eps))
    z <- z + sum_t sigma(K_t)
Reads and writes use the segment-start memory (one update per segment), computed by the
associative-memory op (ops/linear_memory) in fp32 with autocast off: the normaliser grows
linearly with the tokens written and overflows half precision after a few thousand segments
(the inf/NaN reported for half-precision ports). tests/memory/learned/test_infini.py runs
thousands of segments.
Gradients: M and z keep their graph across segments (BPTT as the trainer's policy allows).

Deviations from the paper:
- memory reads and writes use queries/keys *before* RoPE (recovered by rotating the layer's
  RoPE'd q/k back by their positions): the memory sums over positions and has no notion of
  them. The paper's backbone has no RoPE; ports differ (Beomi #23).
- grouped-query attention: one memory per KV head, read by every query head of its group.
- tokens added by other EMBED memories (memory tokens) read the memory but are not written to it.
- decoding: a segment arriving in chunks reads the segment-start memory in every chunk; writes
  accumulate in `pending` and are committed when the segment closes, so chunked decoding equals
  whole-segment processing (contract suite). MemorySpec counts the state between segments; mid-
  segment the pending write can double it (spec slack 2).
- eps in the normaliser (the paper divides by sigma(Q) z, which is 0 on the first segment).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import apply_rope, rope_tables
from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext
from memstack.memory.learned.config import InfiniConfig
from memstack.ops.linear_memory import linear_memory


@dataclass
class InfiniState:
    M: tuple[Tensor, ...]                   # per memory layer (B, Hkv, hd, hd) fp32
    z: tuple[Tensor, ...]                   # per memory layer (B, Hkv, hd) fp32
    pending_M: tuple[Tensor | None, ...]    # writes of a segment still being decoded (None: none)
    pending_z: tuple[Tensor | None, ...]
    readout: tuple[Tensor | None, ...]      # (B, H, T', hd) memory read of this call, attn -> attn_out only


class Infini(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN})

    def __init__(self, cfg: InfiniConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.mem_layers = [l for l in range(backbone.n_layers) if self.applies_to(l)]
        self.slot = {l: i for i, l in enumerate(self.mem_layers)}
        self.gate = nn.Parameter(torch.full((len(self.mem_layers), backbone.n_heads), float(cfg.gate_init)))  # (L, H)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> InfiniState:
        b, n = self.backbone, len(self.mem_layers)
        M = tuple(torch.zeros(batch, b.kv_heads, b.head_dim, b.head_dim, device=device) for _ in range(n))
        z = tuple(torch.zeros(batch, b.kv_heads, b.head_dim, device=device) for _ in range(n))
        return InfiniState(M, z, (None,) * n, (None,) * n, (None,) * n)

    def reset(self, state: InfiniState, mask: Tensor) -> InfiniState:
        m4, m3 = mask[:, None, None, None], mask[:, None, None]
        return InfiniState(tuple(M.masked_fill(m4, 0.0) for M in state.M), tuple(z.masked_fill(m3, 0.0) for z in state.z),
                           tuple(None if p is None else p.masked_fill(m4, 0.0) for p in state.pending_M),
                           tuple(None if p is None else p.masked_fill(m3, 0.0) for p in state.pending_z), state.readout)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        b = self.backbone
        per_layer = b.kv_heads * (b.head_dim * b.head_dim + b.head_dim) * 4     # fp32 whatever the model runs in
        return MemorySpec(fixed_bytes=len(self.mem_layers) * per_layer, slack=2.0, dtype_bytes=4)

    def _unrope(self, x: Tensor, positions: Tensor) -> Tensor:
        """Undo the layer's rotary embedding: rotate x (B, heads, T', hd) back by its positions."""
        cos, sin = rope_tables(positions, self.backbone.head_dim, self.backbone.rope_theta, torch.float32)
        return apply_rope(x.float(), cos, -sin)

    def attn(self, io: AttnIO, state: InfiniState, ctx: StepContext) -> tuple[KVBlock | None, InfiniState]:
        j = self.slot[io.layer]
        with torch.autocast(io.q.device.type, enabled=False):
            sq = F.elu(self._unrope(io.q, ctx.positions)) + 1                       # (B, H, T', hd)
            sk = F.elu(self._unrope(io.k, ctx.positions)) + 1                       # (B, Hkv, T', hd)
            if ctx.n_prefix or ctx.n_suffix:   # only the real tokens are written
                real = torch.zeros(sk.shape[2], dtype=torch.bool, device=sk.device)
                real[ctx.real] = True
                sk = sk * real[:, None]
            read, dM, dz = linear_memory(sq, sk, io.v.float(), state.M[j], state.z[j], rule=self.cfg.rule,
                                         eps=self.cfg.eps)
        M, z, pM, pz, ro = (list(x) for x in (state.M, state.z, state.pending_M, state.pending_z, state.readout))
        if pM[j] is not None:
            dM, dz = pM[j] + dM, pz[j] + dz
        if ctx.all_end:
            M[j], z[j], pM[j], pz[j] = M[j] + dM, z[j] + dz, None, None
        elif ctx.any_end:  # the rows closing a segment commit; the others keep accumulating
            e4, e3 = ctx.seg_end[:, None, None, None], ctx.seg_end[:, None, None]
            M[j], z[j] = torch.where(e4, M[j] + dM, M[j]), torch.where(e3, z[j] + dz, z[j])
            pM[j], pz[j] = dM.masked_fill(e4, 0.0), dz.masked_fill(e3, 0.0)
        else:
            pM[j], pz[j] = dM, dz
        ro[j] = read
        return None, InfiniState(tuple(M), tuple(z), tuple(pM), tuple(pz), tuple(ro))

    def attn_out(self, layer: int, q: Tensor, out: Tensor, state: InfiniState, ctx: StepContext) -> tuple[Tensor, InfiniState]:
        j = self.slot[layer]
        g = torch.sigmoid(self.gate[j].float())[None, :, None, None]                 # (1, H, 1, 1)
        mixed = g * state.readout[j] + (1 - g) * out.float()                        # (B, H, T', hd)
        ro = list(state.readout)
        ro[j] = None
        return mixed.to(out.dtype), InfiniState(state.M, state.z, state.pending_M, state.pending_z, tuple(ro))

    def make_identity(self) -> bool:
        with torch.no_grad():
            self.gate.fill_(-1e4)      # sigmoid(-1e4) == 0 exactly in fp32: local attention only
        return True

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"rule": "delta"}, {"rule": "linear", "layers": [0]}]
