"""Plain references for tests: multi-head attention one head and one query at a time, and a
linear layer in float64 -- obvious, slow, the ground truth for small memory modules."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def mha_loop(q: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
    """Unmasked multi-head attention of q (Tq, D) over k, v (Tk, D), heads = contiguous D slices; float64."""
    q, k, v = q.double(), k.double(), v.double()
    Tq, D = q.shape
    hd = D // n_heads
    out = torch.zeros(Tq, D, dtype=torch.float64)
    for h in range(n_heads):
        sl = slice(h * hd, (h + 1) * hd)
        for i in range(Tq):
            w = torch.softmax(torch.stack([q[i, sl] @ k[j, sl] / math.sqrt(hd) for j in range(k.shape[0])]), 0)
            out[i, sl] = sum(w[j] * v[j, sl] for j in range(k.shape[0]))
    return out


def lin(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) in float64."""
    y = x.double() @ layer.weight.double().T
    return y + layer.bias.double() if layer.bias is not None else y
