"""KIVI-style asymmetric KV quantization (Liu et al., arXiv 2402.02750), reference in plain torch.

Keys are quantized *per channel* (one scale/zero per head-dim channel over a group of tokens:
key outliers live in fixed channels), values *per token* (one scale/zero per token over its
channels). b-bit codes (b in {2, 4, 8}) are packed 8/b to a byte along the last axis.

    codes, scale, zero = quantize(x, bits, dim)     # x (..., N, D); dim = -2 (per channel) or -1 (per token)
    x_hat = dequantize(codes, scale, zero, bits, D)

Asymmetric min-max rounding: x ~ zero + scale * q, q in [0, 2^b - 1]; |x - x_hat| <= scale / 2.
"""
from __future__ import annotations

import torch
from torch import Tensor


def quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., N, D) -> (codes (..., N, D*bits/8) uint8, scale, zero) with scale/zero reduced over
    `dim` (kept as size 1): dim=-2 gives per-channel (..., 1, D), dim=-1 per-token (..., N, 1)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    if x.shape[-1] * bits % 8:
        raise ValueError(f"last dim {x.shape[-1]} * {bits} bits is not a whole number of bytes")
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    q = ((xf - lo) / scale).round_().clamp_(0, qmax).to(torch.uint8)            # (..., N, D)
    return pack(q, bits), scale, lo


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Inverse of `quantize` (fp32)."""
    return unpack(codes, bits).float() * scale + zero


def pack(q: Tensor, bits: int) -> Tensor:
    """(..., D) integer codes < 2^bits -> (..., D*bits/8) uint8, little end first."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per).to(torch.uint8)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    for i in range(per):
        out |= q[..., i] << (bits * i)
    return out


def unpack(codes: Tensor, bits: int) -> Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(codes >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, -1).reshape(*codes.shape[:-1], codes.shape[-1] * per)
