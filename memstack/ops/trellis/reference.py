"""Trellis memory update and read, written as plainly as possible (fp32, a loop over tokens).

State per (example, head): a key memory K (m, d) and a value memory V (m, d): m slots.

Addressing   phi(s) = silu(s) / max(||silu(s)||_2, eps), s = K x / sqrt(d)  (m,) over the slots
Read         o = V^T phi(K q / sqrt(d))                                        (d,)
Write token t with key k_t, value v_t, forget gate alpha_t in [0,1), step size theta_t in [0,1):
  pass 1 (key memory):   a_t = phi(K_c k_t / sqrt(d))
                         K_t = (1 - alpha_t) K_{t-1} - theta_t * grad_K 1/2||K^T a_t - k_t||^2
                             = (1 - alpha_t) K_{t-1} + theta_t a_t (k_t - K_{t-1}^T a_t)^T
  pass 2 (value memory): b_t = phi(K_t k_t / sqrt(d))          (addressed by the *updated* keys)
                         V_t = (1 - alpha_t) V_{t-1} + theta_t b_t (v_t - V_{t-1}^T b_t)^T
K_c is the key memory at the start of the token's chunk of `chunk` tokens (counted from the start
of the call): chunk = 1 is the plain per-token recurrence (K_c = K_{t-1}); a larger chunk computes
pass-1 addresses from the state at the chunk start, as mini-batch test-time gradient descent does
(Titans), which makes every step inside a chunk parallel (ops/trellis/chunked.py). Gates, the
step itself and pass 2 stay per token. The gradient of each inner loss is taken with the address
(a_t, b_t) held fixed, i.e. one online-regression step of the slots towards the incoming
key/value (see memory/kv/trellis.py for this and every other deviation from the paper).
A token with mask False is skipped (identity) and takes no place in the chunk grouping: chunks
are counted over each row's written tokens, so skipped entries (slots invalidated by a reset)
leave the result exactly as if they had never been there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def address(K: Tensor, x: Tensor, eps: float = EPS) -> Tensor:
    """phi(K x / sqrt(d)): K (..., m, d), x (..., n, d) -> (..., n, m) slot weights of unit L2 norm."""
    s = torch.matmul(x, K.transpose(-1, -2)) / math.sqrt(K.shape[-1])   # (..., n, m)
    return F.normalize(F.silu(s), dim=-1, eps=eps)


def written_first(mask: Tensor | None, chunk: int, *xs: Tensor) -> tuple[Tensor | None, tuple[Tensor, ...]]:
    """Reorder each row's tokens so the written ones (mask True) come first, in their order:
    mask (B, T); xs (B, H, T, ...). A no-op without a mask or with chunk = 1 (nothing is grouped)."""
    if mask is None or chunk == 1:
        return mask, xs
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices           # (B, T)

    def take(x: Tensor) -> Tensor:
        idx = order[:, None].expand(x.shape[0], x.shape[1], -1)                       # (B, H, T)
        return x.gather(2, idx.reshape(*idx.shape, *([1] * (x.dim() - 3))).expand_as(x))

    return mask.gather(1, order), tuple(take(x) for x in xs)


def trellis_read_ref(K: Tensor, V: Tensor, q: Tensor) -> Tensor:
    """o = V^T phi(K q). K, V (B, Hkv, m, d); q (B, H, T, d) with H a multiple of Hkv -> (B, H, T, d)."""
    B, H, T, d = q.shape
    Hkv = K.shape[1]
    qg = q.float().reshape(B, Hkv, (H // Hkv) * T, d)                   # query heads of a group share slots
    w = address(K.float(), qg)                                          # (B, Hkv, G*T, m)
    return torch.matmul(w, V.float()).reshape(B, H, T, d)


def trellis_write_ref(K0: Tensor, V0: Tensor, k: Tensor, v: Tensor, alpha: Tensor, theta: Tensor,
                      mask: Tensor | None = None, chunk: int = 1) -> tuple[Tensor, Tensor]:
    """Write T tokens in order. K0, V0 (B, H, m, d); k, v (B, H, T, d); alpha, theta (B, H, T);
    mask (B, T) bool or None; chunk: tokens sharing one pass-1 addressing state. Returns (K_T, V_T)."""
    dt = torch.promote_types(K0.dtype, torch.float32)                   # fp32 state (fp64 in tests)
    K, V = K0.to(dt), V0.to(dt)
    k, v, alpha, theta = k.to(dt), v.to(dt), alpha.to(dt), theta.to(dt)
    mask, (k, v, alpha, theta) = written_first(mask, chunk, k, v, alpha, theta)
    for t in range(k.shape[2]):
        a_t, th_t = alpha[:, :, t, None, None], theta[:, :, t, None, None]   # (B, H, 1, 1)
        if mask is not None:
            on = mask[:, t, None, None, None].to(K.dtype)                      # (B, 1, 1, 1)
            a_t, th_t = a_t * on, th_t * on
        kt, vt = k[:, :, t:t + 1], v[:, :, t:t + 1]                          # (B, H, 1, d)
        if t % chunk == 0:
            Kc = K                                                          # addressing state of this chunk
        a = address(Kc, kt).transpose(-1, -2)                               # (B, H, m, 1)
        K = (1 - a_t) * K + th_t * a * (kt - a.transpose(-1, -2) @ K)       # (B, H, m, d)
        b = address(K, kt).transpose(-1, -2)                                # (B, H, m, 1)
        V = (1 - a_t) * V + th_t * b * (vt - b.transpose(-1, -2) @ V)
    return K, V
