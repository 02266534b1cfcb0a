"""Chunkwise-parallel associative memory in plain torch: the CPU fast path (and the backward of
the Triton kernel). Same contract as `reference.linear_memory_ref`.

Within a block every token reads and corrects against the block-start state, so a block is a
handful of batched matmuls over all its tokens at once: reads (C x dk) @ (dk x dv), delta
corrections (C x dk) @ (dk x dv), the write (dk x C) @ (C x dv). Across blocks:
- linear rule with z_rule "sum": a block's write does not depend on the state, so every block's
  write is computed at once and the block-start states are an exclusive prefix sum -- no loop;
- otherwise (delta rule, or ARMT's new-information z): a loop over blocks (not tokens).
With many small blocks (nb x dk x dv > T^2) the linear rule uses the masked quadratic form instead
(token t sees token s iff s sits in an earlier block), which never builds per-block states.
The whole computation runs in fp32 with autocast off (long sums of keys overflow half precision).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.ops.linear_memory.reference import check_args


def _read(q: Tensor, M: Tensor, z: Tensor, eps: float) -> Tensor:
    """q (B, Hkv, G, ..., C, dk) against M (B, Hkv, ..., dk, dv), z (B, Hkv, ..., dk)."""
    num = torch.einsum("bhg...ck,bh...kv->bhg...cv", q, M)
    den = torch.einsum("bhg...ck,bh...k->bhg...c", q, z) + eps
    return num / den[..., None]


def _write(k: Tensor, u: Tensor, z: Tensor, z_rule: str, eps: float) -> tuple[Tensor, Tensor]:
    """One block's write: k (B, Hkv, ..., C, dk), u (B, Hkv, ..., C, dv) (already corrected and
    beta-weighted), z the block-start normaliser."""
    dM = torch.einsum("bh...ck,bh...cv->bh...kv", k, u)
    if z_rule == "new_info":
        kz = torch.einsum("bh...ck,bh...k->bh...c", k, z)
        gamma = (1 - kz / ((k * k).sum(-1) + eps)).clamp(0, 1).detach()
        return dM, (gamma[..., None] * k).sum(-2)
    return dM, k.sum(-2)


def linear_memory_chunked(q: Tensor, k: Tensor, v: Tensor, M: Tensor, z: Tensor, beta: Tensor | None = None, *,
                          rule: str = "linear", z_rule: str = "sum", eps: float = 1e-6,
                          block: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    check_args(q, k, v, M, z, beta, rule, z_rule, block)
    B, H, T, dk = q.shape
    Hkv, dv = k.shape[1], v.shape[3]
    G = H // Hkv
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, M, z = q.float(), k.float(), v.float(), M.float(), z.float()
        C = min(block or T, T) if T else 1
        nb = -(-T // C) if T else 0
        pad = nb * C - T
        if pad:  # zero keys/values write nothing; padded queries are sliced off
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        u = v
        if beta is not None:
            bf = F.pad(beta.float(), (0, pad)) if pad else beta.float()
        qb = q.reshape(B, Hkv, G, nb, C, dk)                         # (B, Hkv, G, nb, C, dk)
        kb, vb = k.reshape(B, Hkv, nb, C, dk), v.reshape(B, Hkv, nb, C, dv)
        if nb == 0:
            return q.new_zeros(B, H, 0, dv), torch.zeros_like(M), torch.zeros_like(z)
        if rule == "linear" and z_rule == "sum" and nb * dk * dv > T * T:
            # many small blocks: every block-start state would be materialised (nb x dk x dv);
            # the masked quadratic form is cheaper -- token t sees token s iff block(s) < block(t)
            u = v * bf[..., None] if beta is not None else v                    # (B, Hkv, T', dv)
            blk = torch.arange(nb * C, device=q.device) // C
            vis = (blk[None, :] < blk[:, None]).to(q.dtype)                     # (T', T') strict block-causal
            qg = q.reshape(B, Hkv, G, nb * C, dk)
            A = torch.einsum("bhgtk,bhsk->bhgts", qg, k) * vis                  # (B, Hkv, G, T', T')
            num = torch.einsum("bhgts,bhsv->bhgtv", A, u) + torch.einsum("bhgtk,bhkv->bhgtv", qg, M)
            den = A.sum(-1) + torch.einsum("bhgtk,bhk->bhgt", qg, z) + eps
            o = (num / den[..., None]).reshape(B, H, nb * C, dv)[:, :, :T]
            return o, torch.einsum("bhsk,bhsv->bhkv", k, u), k.sum(2)
        if rule == "linear" and z_rule == "sum":
            ub = vb * bf.reshape(B, Hkv, nb, C, 1) if beta is not None else vb
            dMs, dzs = _write(kb, ub, z, z_rule, eps)                # (B, Hkv, nb, dk, dv), (B, Hkv, nb, dk)
            # block-start states: M + the writes of all earlier blocks (exclusive prefix sum)
            Ms = M[:, :, None] + torch.cat([torch.zeros_like(dMs[:, :, :1]), dMs[:, :, :-1].cumsum(2)], 2)
            zs = z[:, :, None] + torch.cat([torch.zeros_like(dzs[:, :, :1]), dzs[:, :, :-1].cumsum(2)], 2)
            o = _read(qb, Ms, zs, eps)                               # (B, Hkv, G, nb, C, dv)
            dM, dz = dMs.sum(2), dzs.sum(2)
        else:
            outs, Mb, zb = [], M, z
            dM, dz = torch.zeros_like(M), torch.zeros_like(z)
            for b in range(nb):
                kc, vc = kb[:, :, b], vb[:, :, b]                    # (B, Hkv, C, dk), (B, Hkv, C, dv)
                outs.append(_read(qb[:, :, :, b], Mb, zb, eps))      # (B, Hkv, G, C, dv)
                if rule == "delta":
                    vc = vc - _read(kc[:, :, None], Mb, zb, eps)[:, :, 0]
                if beta is not None:
                    vc = vc * bf[:, :, b * C:(b + 1) * C, None]
                dMb, dzb = _write(kc, vc, zb, z_rule, eps)
                Mb, zb = Mb + dMb, zb + dzb
                dM, dz = dM + dMb, dz + dzb
            o = torch.stack(outs, dim=3)                             # (B, Hkv, G, nb, C, dv)
        o = o.reshape(B, H, nb * C, dv)[:, :, :T]
        return o, dM, dz
