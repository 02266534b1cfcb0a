"""Trellis write, faster: pass 1 token by token (it must be), pass 2 in parallel per chunk.

Pass 1 (the key memory) cannot be parallelised exactly: the address a_t = phi(K_{t-1} k_t) goes
through a nonlinearity of the previous state, so each token needs the state the one before left.
Pass 2 (the value memory) is *linear* in V once the addresses b_t = phi(K_t k_t) are known:

    V_t = [(1 - alpha_t) I - theta_t b_t b_t^T] V_{t-1} + theta_t b_t v_t^T

a gated delta rule in slot space, which has an exact chunkwise (WY) form. Writing
gamma_t = prod_{i<=t} (1 - alpha_i) inside a chunk that starts from V_0,

    V_t = gamma_t V_0 + sum_{j<=t} (gamma_t / gamma_j) b_j w_j^T,
    w_t = theta_t (v_t - gamma_{t-1} V_0^T b_t - sum_{j<t} (gamma_{t-1} / gamma_j) (b_j . b_t) w_j)

so W solves one unit-lower-triangular C x C system per chunk, and the chunk's end state is
gamma_C V_0 + B^T diag(gamma_C / gamma) W. Decay ratios are formed as exp(differences of
cumulative log(1 - alpha)) <= 1, never as quotients, so they cannot overflow. Equal to the
reference (ops/trellis/reference.py) up to rounding; the tests hold it to that, forward and backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.ops.trellis.reference import EPS


def _value_chunk(V: Tensor, b: Tensor, v: Tensor, alpha: Tensor, theta: Tensor) -> Tensor:
    """One chunk of pass 2. V (B,H,m,d); b (B,H,C,m); v (B,H,C,d); alpha, theta (B,H,C)."""
    C = b.shape[2]
    la = torch.log1p(-alpha)                                            # (B,H,C) log(1 - alpha) <= 0
    cum = la.cumsum(-1)                                                 # log gamma_t
    prev = cum - la                                                     # log gamma_{t-1}
    strict = torch.ones(C, C, dtype=torch.bool, device=b.device).tril(-1)   # j < t
    expo = (prev[..., :, None] - cum[..., None, :]).masked_fill(~strict, float("-inf"))
    L = torch.exp(expo) * (b @ b.transpose(-1, -2))                     # (B,H,C,C) strictly lower
    rhs = theta[..., None] * (v - prev.exp()[..., None] * (b @ V))      # (B,H,C,d)
    M = torch.eye(C, dtype=b.dtype, device=b.device) + theta[..., None] * L
    W = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)   # (B,H,C,d)
    last = cum[..., -1:]                                                # (B,H,1) log gamma_C
    return last.exp()[..., None] * V + b.transpose(-1, -2) @ ((last - cum).exp()[..., None] * W)


def trellis_write_chunked(K0: Tensor, V0: Tensor, k: Tensor, v: Tensor, alpha: Tensor, theta: Tensor,
                          mask: Tensor | None = None, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Same contract as `trellis_write_ref`."""
    B, H, m, d = K0.shape
    T = k.shape[2]
    dt = torch.promote_types(K0.dtype, torch.float32)                   # fp32 state (fp64 in tests)
    K, V = K0.to(dt), V0.to(dt)
    k, v, alpha, theta = k.to(dt), v.to(dt), alpha.to(dt), theta.to(dt)
    if mask is not None:                                                # a skipped token: alpha = theta = 0
        on = mask[:, None, :].to(dt)                                    # (B,1,T)
        alpha, theta = alpha * on, theta * on
    if not T:
        return K, V
    # pass 1, sequential, on (B*H) stacks with as few ops per token as possible: one bmm gives both
    # b_t = phi(K_t k_t) and the next token's a_{t+1} = phi(K_t k_{t+1}); the slot update is one baddbmm
    BH = B * H
    Kf = K.reshape(BH, m, d)
    kf = k.reshape(BH, T, d)
    ks = kf.transpose(1, 2) / math.sqrt(d)                              # (BH, d, T) scaled keys for addressing
    keep = (1 - alpha).reshape(BH, T, 1, 1).unbind(1)                   # per token (BH, 1, 1)
    step = theta.reshape(BH, T, 1, 1).unbind(1)
    a = F.normalize(F.silu(torch.bmm(Kf, ks[:, :, :1])), dim=1, eps=EPS)    # (BH, m, 1) a_0
    bs = []
    for t in range(T):
        diff = kf[:, t:t + 1] - torch.bmm(a.transpose(1, 2), Kf)        # (BH, 1, d) k_t - K^T a_t
        Kf = torch.baddbmm(Kf * keep[t], a * step[t], diff)             # (BH, m, d)
        w = F.normalize(F.silu(torch.bmm(Kf, ks[:, :, t:t + 2])), dim=1, eps=EPS)   # (BH, m, 1|2)
        bs.append(w[:, :, 0])
        a = w[:, :, 1:2]
    b = torch.stack(bs, dim=1).reshape(B, H, T, m)                      # (B,H,T,m)
    for s in range(0, T, chunk):                                        # pass 2: chunkwise parallel
        e = min(s + chunk, T)
        V = _value_chunk(V, b[:, :, s:e], v[:, :, s:e], alpha[:, :, s:e], theta[:, :, s:e])
    return Kf.reshape(B, H, m, d), V
