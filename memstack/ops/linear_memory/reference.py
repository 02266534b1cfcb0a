"""Reference associative ("linear attention") memory: a plain per-token loop in fp32. Obvious, slow.

The op every linear/associative memory of the learned family uses (Infini-attention, ARMT).
A memory is a matrix M (dk x dv) and a normaliser z (dk) per (batch, kv head). Keys and queries
arrive already feature-mapped (ELU+1, DPFP, ...) and must be non-negative, so the normaliser
q . z is >= 0 and the read is a weighted average of stored values.

Tokens are grouped into blocks of `block` consecutive tokens (None: one block, the whole call).
Token t of block b:
    reads    o_t = q_t M_b / (q_t . z_b + eps)           (every query head of the kv head's group)
    writes   linear: u_t = v_t
             delta:  u_t = v_t - k_t M_b / (k_t . z_b + eps)  (subtract what is already stored)
             dM_b += beta_t * k_t^T u_t                   (beta: a per-token write strength, default 1)
             dz_b += k_t                                  (z_rule "sum"), or
             dz_b += gamma_t k_t, gamma_t = clip(1 - k_t . z_b / (k_t . k_t + eps), 0, 1),
                    detached                              (z_rule "new_info", ARMT's correction)
and after the block:   M_{b+1} = M_b + dM_b,  z_{b+1} = z_b + dz_b.
So reads and delta corrections inside a block see the state at the block's start -- exactly
the segment-level memories of Infini-attention and ARMT when a block is a segment; with
block=1 every token sees all earlier tokens (causal linear attention / a DeltaNet-style rule
without the current token).

Shapes: q (B, H, T, dk) with H = G * Hkv (query head h reads kv head h // G), k (B, Hkv, T, dk),
v (B, Hkv, T, dv), beta (B, Hkv, T) or None, M (B, Hkv, dk, dv), z (B, Hkv, dk).
Returns (o (B, H, T, dv), dM (B, Hkv, dk, dv), dz (B, Hkv, dk)), all fp32: the reads and the
total change of the state over the call (M_end = M + dM), so a caller can also hold writes
pending (decoding a segment in chunks).
"""
from __future__ import annotations

import torch
from torch import Tensor

RULES = ("linear", "delta")
Z_RULES = ("sum", "new_info")


def check_args(q: Tensor, k: Tensor, v: Tensor, M: Tensor, z: Tensor, beta: Tensor | None, rule: str, z_rule: str,
               block: int | None) -> None:
    """Raise one ValueError listing every problem with the arguments."""
    r = []
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        r.append(f"q, k, v must be 4-D (B, heads, T, dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    else:
        B, H, T, dk = q.shape
        Hkv, dv = k.shape[1], v.shape[3]
        if k.shape != (B, Hkv, T, dk):
            r.append(f"k must be (B, Hkv, T, dk) = ({B}, Hkv, {T}, {dk}); got {tuple(k.shape)}")
        if v.shape[:3] != (B, Hkv, T):
            r.append(f"v must be (B, Hkv, T, dv) matching k {tuple(k.shape)}; got {tuple(v.shape)}")
        if Hkv < 1 or H % Hkv:
            r.append(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
        if M.shape != (B, Hkv, dk, dv):
            r.append(f"M must be (B, Hkv, dk, dv) = ({B}, {Hkv}, {dk}, {dv}); got {tuple(M.shape)}")
        if z.shape != (B, Hkv, dk):
            r.append(f"z must be (B, Hkv, dk) = ({B}, {Hkv}, {dk}); got {tuple(z.shape)}")
        if beta is not None and beta.shape != (B, Hkv, T):
            r.append(f"beta must be (B, Hkv, T) = ({B}, {Hkv}, {T}); got {tuple(beta.shape)}")
    if rule not in RULES:
        r.append(f"rule must be one of {RULES}, got {rule!r}")
    if z_rule not in Z_RULES:
        r.append(f"z_rule must be one of {Z_RULES}, got {z_rule!r}")
    if block is not None and block < 1:
        r.append(f"block must be >= 1 or None, got {block}")
    if r:
        raise ValueError("linear_memory: " + "; ".join(r))


def linear_memory_ref(q: Tensor, k: Tensor, v: Tensor, M: Tensor, z: Tensor, beta: Tensor | None = None, *,
                      rule: str = "linear", z_rule: str = "sum", eps: float = 1e-6,
                      block: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    check_args(q, k, v, M, z, beta, rule, z_rule, block)
    B, H, T, dk = q.shape
    Hkv, dv = k.shape[1], v.shape[3]
    G = H // Hkv
    block = block or max(T, 1)
    q, k, v, M, z = q.float(), k.float(), v.float(), M.float(), z.float()
    beta = beta.float() if beta is not None else None
    outs = []
    Mb, zb = M, z                                                   # state at the current block's start
    dMb, dzb = torch.zeros_like(M), torch.zeros_like(z)             # the current block's writes
    dM_all, dz_all = torch.zeros_like(M), torch.zeros_like(z)
    for t in range(T):
        if t and t % block == 0:                                    # a block ended: commit its writes
            Mb, zb = Mb + dMb, zb + dzb
            dM_all, dz_all = dM_all + dMb, dz_all + dzb
            dMb, dzb = torch.zeros_like(M), torch.zeros_like(z)
        qt = q[:, :, t].reshape(B, Hkv, G, dk)                      # (B, Hkv, G, dk)
        num = torch.einsum("bhgk,bhkv->bhgv", qt, Mb)               # (B, Hkv, G, dv)
        den = torch.einsum("bhgk,bhk->bhg", qt, zb) + eps           # (B, Hkv, G)
        outs.append((num / den[..., None]).reshape(B, H, dv))
        kt, vt = k[:, :, t], v[:, :, t]                             # (B, Hkv, dk), (B, Hkv, dv)
        kz = (kt * zb).sum(-1)                                      # (B, Hkv)
        if rule == "delta":
            vt = vt - torch.einsum("bhk,bhkv->bhv", kt, Mb) / (kz + eps)[..., None]
        if beta is not None:
            vt = vt * beta[:, :, t, None]
        dMb = dMb + kt[..., :, None] * vt[..., None, :]             # (B, Hkv, dk, dv)
        if z_rule == "new_info":
            gamma = (1 - kz / ((kt * kt).sum(-1) + eps)).clamp(0, 1).detach()
            dzb = dzb + gamma[..., None] * kt
        else:
            dzb = dzb + kt
    dM_all, dz_all = dM_all + dMb, dz_all + dzb
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, dv)  # (B, H, T, dv)
    return o, dM_all, dz_all
