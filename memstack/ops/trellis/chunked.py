"""Trellis write, in parallel inside each chunk (exactly the reference's rule, see reference.py).

Given the addresses, both passes are *linear* in their memory: a gated delta rule in slot space,

    M_t = [(1 - alpha_t) I - theta_t e_t e_t^T] M_{t-1} + theta_t e_t x_t^T      (e = a or b, x = k or v)

which has an exact chunkwise (WY) form. With gamma_t = prod_{i<=t} (1 - alpha_i) inside a chunk
that starts from M_0,

    M_t = gamma_t M_0 + sum_{j<=t} (gamma_t / gamma_j) e_j w_j^T,
    w_t = theta_t (x_t - gamma_{t-1} M_0^T e_t - sum_{j<t} (gamma_{t-1} / gamma_j) (e_j . e_t) w_j),

so W solves one unit-lower-triangular C x C system per chunk. Pass-1 addresses a_t = phi(K_c k_t)
use the chunk-start keys K_c (known up front); pass 2 needs b_t = phi(K_t k_t) with every
intermediate K_t, which the same form gives without materialising any K_t:
K_t k_t = gamma_t K_0 k_t + sum_{j<=t} (gamma_t / gamma_j) a_j (w_j . k_t). Decay ratios are
exp(differences of cumulative log(1 - alpha)) <= 1, never quotients, so they cannot overflow.
Equal to the per-token loop up to rounding; the tests hold it to that, forward and backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.ops.trellis.reference import EPS, written_first


def delta_chunk(M: Tensor, e: Tensor, x: Tensor, alpha: Tensor, theta: Tensor,
                probe: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One chunk of the gated delta rule. M (B,H,m,d); e (B,H,C,m) addresses; x (B,H,C,d) targets;
    alpha, theta (B,H,C). Returns (M_C, P) with P[t] = M_t probe_t (B,H,C,m) when probe (B,H,C,d) is given."""
    C = e.shape[2]
    la = torch.log1p(-alpha)                                            # (B,H,C) log(1 - alpha) <= 0
    cum = la.cumsum(-1)                                                 # log gamma_t
    prev = cum - la                                                     # log gamma_{t-1}
    idx = torch.arange(C, device=e.device)
    diff = cum[..., :, None] - cum[..., None, :]                        # log(gamma_t / gamma_j)
    strict = (idx[:, None] > idx[None, :])                              # j < t
    L = torch.exp((diff - la[..., :, None]).masked_fill(~strict, float("-inf"))) * (e @ e.transpose(-1, -2))
    rhs = theta[..., None] * (x - prev.exp()[..., None] * (e @ M))      # (B,H,C,d)
    A = torch.eye(C, dtype=e.dtype, device=e.device) + theta[..., None] * L
    W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)   # (B,H,C,d)
    last = cum[..., -1:]                                                # (B,H,1) log gamma_C
    M_new = last.exp()[..., None] * M + e.transpose(-1, -2) @ ((last - cum).exp()[..., None] * W)
    if probe is None:
        return M_new, None
    D = torch.exp(diff.masked_fill(~(idx[:, None] >= idx[None, :]), float("-inf")))   # gamma_t / gamma_j, j <= t
    P = cum.exp()[..., None] * (probe @ M.transpose(-1, -2)) + (D * (probe @ W.transpose(-1, -2))) @ e
    return M_new, P


def trellis_write_chunked(K0: Tensor, V0: Tensor, k: Tensor, v: Tensor, alpha: Tensor, theta: Tensor,
                          mask: Tensor | None = None, chunk: int = 1) -> tuple[Tensor, Tensor]:
    """Same contract as `trellis_write_ref`. chunk = 1 (every token addresses the state the one
    before left) runs pass 1 token by token and pass 2 as one parallel chunk per 64 tokens."""
    dt = torch.promote_types(K0.dtype, torch.float32)                   # fp32 state (fp64 in tests)
    K, V = K0.to(dt), V0.to(dt)
    k, v, alpha, theta = k.to(dt), v.to(dt), alpha.to(dt), theta.to(dt)
    mask, (k, v, alpha, theta) = written_first(mask, chunk, k, v, alpha, theta)   # skipped tokens take no chunk place
    if mask is not None:                                                # a skipped token: alpha = theta = 0
        on = mask[:, None, :].to(dt)                                    # (B,1,T)
        alpha, theta = alpha * on, theta * on
    T, d = k.shape[2], k.shape[3]
    if chunk == 1 and T > 1:
        return _per_token_keys(K, V, k, v, alpha, theta)
    scale = 1 / math.sqrt(d)
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        kc, vc, ac, tc = k[:, :, s:e], v[:, :, s:e], alpha[:, :, s:e], theta[:, :, s:e]
        a = F.normalize(F.silu(kc @ K.transpose(-1, -2) * scale), dim=-1, eps=EPS)   # (B,H,C,m) from K_c
        K, P = delta_chunk(K, a, kc, ac, tc, probe=kc)                              # P[t] = K_t k_t
        b = F.normalize(F.silu(P * scale), dim=-1, eps=EPS)                         # (B,H,C,m)
        V, _ = delta_chunk(V, b, vc, ac, tc)
    return K, V


def _per_token_keys(K: Tensor, V: Tensor, k: Tensor, v: Tensor, alpha: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """chunk = 1: pass 1 is inherently sequential (each address goes through a nonlinearity of the
    state the previous token left), done on (B*H) stacks with one bmm per token for both b_t and
    the next a_{t+1}; pass 2 is then linear and runs in parallel chunks of 64."""
    B, H, m, d = K.shape
    T = k.shape[2]
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
    for s in range(0, T, 64):
        e = min(s + 64, T)
        V, _ = delta_chunk(V, b[:, :, s:e], v[:, :, s:e], alpha[:, :, s:e], theta[:, :, s:e])
    return Kf.reshape(B, H, m, d), V
