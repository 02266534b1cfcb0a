"""Backbone building blocks: RMSNorm, rotary position embedding, SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, in fp32 whatever the input (one fused op; the
        # spelled-out form was ~6 ops, which dominates a decode step of a small model on CPU)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


_INV_FREQ: dict[tuple, Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """theta^(-i / half), float64 (a constant of the model: computed once per device)."""
    key = (head_dim, float(theta), str(device))
    t = _INV_FREQ.get(key)
    if t is None:
        half = head_dim // 2
        with torch.inference_mode(False), torch.no_grad():   # a plain tensor, usable in any mode later
            t = _INV_FREQ[key] = theta ** (-torch.arange(half, device=device, dtype=torch.float64) / half)
    return t


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (B, 1, T, head_dim/2) for integer positions (B, T).

    Angles are formed in float64: positions reach 10^5-10^6 in long-context evaluation, where
    float32 angles would lose ~0.03 rad at the highest frequency.
    """
    ang = positions.to(torch.float64)[..., None] * _inv_freq(head_dim, theta, positions.device)   # (B, T, half)
    return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by position; pairs are (x[..., :D/2], x[..., D/2:]) (the Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def fused_weight(holder: nn.Module, *linears: nn.Linear) -> Tensor | None:
    """The weights of `linears` concatenated (one GEMM instead of several), for inference only:
    None when gradients are needed or a hook watches one of them. Cached on `holder` and rebuilt when any weight changes (an
    optimizer step or a load bumps the version counter; a move changes the storage)."""
    ws = [lin.weight for lin in linears]
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return None
    if any(lin._forward_hooks or lin._forward_pre_hooks for lin in linears):
        return None                                           # someone observes the projections: call them
    key = tuple((w.data_ptr(), w._version, w.dtype) for w in ws)
    cached = holder.__dict__.get("_fused")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat([w.detach() for w in ws]))
        holder.__dict__["_fused"] = cached                    # not a buffer: never saved, never moved
    return cached[1]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = fused_weight(self, self.w_gate, self.w_up)
        if w is None:
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        gate, up = F.linear(x, w).chunk(2, dim=-1)                  # inference: one GEMM for both
        return self.w_down(F.silu(gate) * up)
