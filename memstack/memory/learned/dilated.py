"""The Compressive Transformer's dilated-convolution compression function (Rae et al., arXiv
1911.05507, section 3.1 lists max/mean pooling, 1D convolution, dilated convolutions and
most-used; memory/learned/compressive.py implements the others).

The paper names dilated convolutions without giving their layout. Ours (a documented choice): a
WaveNet-style stack of log2(rate) kernel-2 1-D convolutions over the evicted states, with
dilations 1, 2, 4, ..., rate/2, each causal (left-padded), read at the last state of every group
of `rate`:

    x_0 = evicted states (B, D, E)
    x_l = Conv1d_l(pad_left(x_{l-1}, 2^(l-1)))      kernel 2, dilation 2^(l-1), D -> D channels
    f_c = x_L[:, :, rate-1 :: rate]                  (B, D, E / rate)

The output at position t sees exactly the states t - rate + 1 .. t, so each compressed slot reads
exactly its own group (as the kernel = stride = rate convolution does) and never the padding, but
through a hierarchy of pairwise mixes with 2 x log2(rate) x D^2 weights instead of rate x D^2.
Each layer starts as the mean of its two taps (weights 1/2 on each channel's own input, bias 0),
so the whole stack starts as mean pooling, like the paper-less initialisation of our 1D conv.
Deviations: no nonlinearity or gating between the layers (the stack is linear; WaveNet gates its
layers -- the paper does not say); rate must be a power of two.

`dilated_reference` computes the same thing group by group with explicit loops (tests compare).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dilations(rate: int) -> list[int]:
    if rate < 1 or rate & (rate - 1):
        raise ValueError(f"the dilated-conv compressor needs a power-of-two rate, got {rate}")
    return [1 << i for i in range(rate.bit_length() - 1)]             # rate 8 -> [1, 2, 4]


class DilatedCompressor(nn.Module):
    """(B, D, E) evicted states -> (B, D, E / rate) compressed slots (same interface as
    `nn.Conv1d(D, D, kernel_size=rate, stride=rate)`)."""

    def __init__(self, d: int, rate: int):
        super().__init__()
        self.rate = rate
        self.layers = nn.ModuleList(nn.Conv1d(d, d, kernel_size=2, dilation=dl) for dl in dilations(rate))
        with torch.no_grad():
            for c in self.layers:                                      # each layer: mean of its two taps
                c.weight.zero_()
                c.weight[torch.arange(d), torch.arange(d)] = 0.5      # (D_out, D_in, 2)
                c.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        for c in self.layers:
            x = c(F.pad(x, (c.dilation[0], 0)))                        # causal: (B, D, E)
        return x[:, :, self.rate - 1:: self.rate]                      # (B, D, E / rate)


def dilated_reference(comp: DilatedCompressor, x: Tensor) -> Tensor:
    """The compressor group by group: for each group of `rate` states, apply the layers as a
    binary tree of pairwise mixes (layer l combines states 2^l apart), fp64."""
    B, D, E = x.shape
    r = comp.rate
    out = torch.zeros(B, D, E // r, dtype=torch.float64)
    for g in range(E // r):
        level = [x[:, :, g * r + i].double() for i in range(r)]        # the group's states, oldest first
        for c in comp.layers:
            w, b = c.weight.double(), c.bias.double()                  # (D, D, 2): tap 0 = older, tap 1 = newer
            level = [w[:, :, 0] @ level[2 * i].T + w[:, :, 1] @ level[2 * i + 1].T + b[:, None]
                     for i in range(len(level) // 2)]
            level = [t.T for t in level]                               # (B, D) each
        out[:, :, g] = level[0]
    return out


__all__ = ["DilatedCompressor", "dilated_reference", "dilations"]
