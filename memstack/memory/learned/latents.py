"""Perceiver-style latent memory (Perceiver, Jaegle et al., arXiv 2103.03206; Perceiver IO,
arXiv 2107.14795), made recurrent over segments.

What it stores: a fixed array of `n_latents` latent vectors (B, N, D). A document starts from a
learned initial array Z0 (the Perceiver's learned latent array); after each segment the array is
rewritten from that segment and carried to the next one.

Write (at each segment end, from the whole segment): the Perceiver's encoder step. The latents
cross-attend to the segment's final hidden states (the last block's output of the real tokens),
then pass through `self_layers` latent self-attention blocks:
    Z <- Z + XAttn(norm(Z), norm(H));  Z <- Z + MLP(norm(Z))                  (cross-attend)
    Z <- Z + SelfAttn(norm(Z));       Z <- Z + MLP(norm(Z))    x self_layers  (latent tower)
    Z <- RMSNorm(Z)
The array is the bottleneck: whatever the next segments learn about this one passes through N
vectors, whatever the segment length (cost O(N * T) per write).

Read (our choice, the question the Perceiver leaves open for a decoder): every layer in `layers`
reads the latents as extra keys/values, projected by that layer's own norm, K/V projections and
RoPE -- as Transformer-XL reads its cached states, and as a Perceiver IO decoder's queries
cross-attend to the latent array, except that here the queries are the segment's own tokens and
the read shares the softmax with the segment's causal self-attention. All latents sit at the RoPE
position just before the segment (start - 1, start = the seg_len-aligned segment start of the
chunk), so every segment sees them at the same relative distance, and a segment decoded token by
token reads exactly what it reads whole.

Deviations from the papers:
- recurrence: the Perceiver encodes one input; here the latent array is carried across segments
  (like Perceiver AR's / RMT's bottleneck) with gradients across the segments of a training step
  (the trainer's BPTT policy), and starts each document from Z0.
- the final RMSNorm of the written array (learned gain) keeps its scale bounded over thousands of
  segments; the Perceiver has no recurrence to bound.
- the write reads the final hidden states of the segment (not raw inputs with Fourier features);
  they carry no explicit position, the backbone's RoPE attention mixes order into them.
- the Perceiver's iterated cross-attends with weight sharing are one cross-attend per segment.
`make_identity` is not supported: latent keys always take part of the attention's mass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.backbone.layers import RMSNorm, SwiGLU
from memstack.config import BackboneConfig
from memstack.memory.base import AttnIO, KVBlock, Memory, MemorySpec, Site, StepContext, dtype_bytes, segment_so_far
from memstack.memory.learned.config import LatentConfig


@dataclass
class LatentState:
    z: Tensor          # (B, N, D) the latent array
    pending: Tensor    # (B, Tp, D) final hidden states of this segment's tokens so far


class _Attention(nn.Module):
    """Multi-head attention of queries over keys/values (no mask: every latent sees everything)."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        B, N, D = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.n_heads, D // self.n_heads).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(heads(self.wq(x)), heads(self.wk(ctx)), heads(self.wv(ctx)))
        return self.wo(o.transpose(1, 2).reshape(B, N, D))                    # (B, N, D)


class _LatentBlock(nn.Module):
    """Pre-norm attention + SwiGLU MLP on the latents; cross=True attends to the segment."""

    def __init__(self, d: int, n_heads: int, ff: int, eps: float, cross: bool):
        super().__init__()
        self.cross = cross
        self.norm_z, self.norm_mlp = RMSNorm(d, eps), RMSNorm(d, eps)
        self.norm_x = RMSNorm(d, eps) if cross else None
        self.attn = _Attention(d, n_heads)
        self.mlp = SwiGLU(d, ff)

    def forward(self, z: Tensor, x: Tensor | None) -> Tensor:
        zn = self.norm_z(z)
        z = z + self.attn(zn, self.norm_x(x) if self.cross else zn)
        return z + self.mlp(self.norm_mlp(z))


class Latents(Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.ATTN, Site.BLOCK})

    def __init__(self, cfg: LatentConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        D, eps = backbone.d_model, backbone.norm_eps
        self.read_layers = frozenset(l for l in range(backbone.n_layers) if cfg.layers is None or l in cfg.layers)
        self.write_layer = backbone.n_layers - 1
        self.z0 = nn.Parameter(torch.randn(cfg.n_latents, D) * cfg.init_std)             # (N, D)
        self.blocks = nn.ModuleList(_LatentBlock(D, cfg.n_heads, backbone.ff_dim, eps, cross=i == 0)
                                    for i in range(1 + cfg.self_layers))
        self.out_norm = RMSNorm(D, eps)
        for name, p in self.blocks.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, cfg.init_std)

    def applies_to(self, layer: int) -> bool:
        return layer in self.read_layers or layer == self.write_layer

    def optim_group(self, name: str) -> str | None:
        return "no_decay" if name == "z0" else None   # a learned input array: decay would pull it to 0

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LatentState:
        return LatentState(self.z0.to(device=device, dtype=dtype).expand(batch, -1, -1).clone(),
                           torch.zeros(batch, 0, self.backbone.d_model, device=device, dtype=dtype))

    def reset(self, state: LatentState, mask: Tensor) -> LatentState:
        z0 = self.z0.to(state.z.dtype).expand_as(state.z)
        return LatentState(torch.where(mask[:, None, None], z0, state.z), state.pending)

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        db = dtype_bytes(dtype)
        return MemorySpec(fixed_bytes=self.cfg.n_latents * self.backbone.d_model * db, dtype_bytes=db)

    # -- read: extra keys/values -----------------------------------------------------------------
    def attn(self, io: AttnIO, state: LatentState, ctx: StepContext) -> tuple[KVBlock | None, LatentState]:
        if io.layer not in self.read_layers:
            return None, state
        S = self.backbone.seg_len
        start = ctx.pos - ctx.pos.remainder(S)                                  # (B,) segment start
        pos = (start - 1)[:, None].expand(-1, self.cfg.n_latents)               # (B, N)
        k, v = io.project_kv(state.z.to(io.h.dtype), pos)                      # (B, Hkv, N, hd)
        return KVBlock(k, v), state

    # -- write: at the last block, once the segment is complete ----------------------------------
    def block(self, layer: int, h: Tensor, state: LatentState, ctx: StepContext) -> tuple[Tensor, LatentState]:
        if layer != self.write_layer:
            return h, state
        seg = segment_so_far(state.pending, h[:, ctx.real], ctx)                # (B, Tp + T, D)
        if not ctx.seg_end:
            return h, LatentState(state.z, seg)
        z = state.z
        for i, blk in enumerate(self.blocks):
            z = blk(z, seg if i == 0 else None)
        z = self.out_norm(z).to(state.z.dtype)                                  # (B, N, D)
        return h, LatentState(z, seg.new_zeros(seg.shape[0], 0, seg.shape[2]))

    @classmethod
    def contract_configs(cls) -> list[dict]:
        return [{"n_latents": 6, "n_heads": 2}, {"n_latents": 4, "n_heads": 1, "self_layers": 0, "layers": [1]}]
