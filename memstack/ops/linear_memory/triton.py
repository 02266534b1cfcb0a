"""Fused associative-memory kernel in Triton (the GPU fast path). Same contract as the reference.

One program per (batch, kv head) keeps M (dk x dv) and z (dk) in fp32 registers and streams the
sequence once in tiles of BT tokens: each tile's queries (all G query heads of the group) read
the block-start state, its keys/values are corrected (delta rule) and accumulated into the
block's write, and at each block boundary the write is committed. Q, K, V are read once and M
never leaves the chip, which is the point against the torch path (separate matmuls, M and the
intermediate reads round-tripping through memory).

Backward: NOT a Triton kernel. It recomputes the forward with the torch chunkwise path
(`chunked.py`) under autograd and differentiates that -- correct (tested against the reference)
and memory-light, but not fused. Matmuls use IEEE fp32 (`input_precision="ieee"`), not TF32, so
results match the fp32 reference to its tolerance.

Triton is imported when this module is imported, i.e. only when the fast path is used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from memstack.ops.linear_memory.chunked import linear_memory_chunked
from memstack.ops.linear_memory.reference import check_args

BT = 16  # tokens per tile (tl.dot needs >= 16)


@triton.jit
def _linear_memory_fwd(Q, K, V, BETA, M0, Z0, O, DM, DZ,
                       T, block, eps,
                       H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                       DELTA: tl.constexpr, NEW_INFO: tl.constexpr, HAS_BETA: tl.constexpr):
    pid = tl.program_id(0)                    # = b * HKV + hkv
    b = pid // HKV
    hkv = pid % HKV
    ik = tl.arange(0, BK)
    iv = tl.arange(0, BV)
    mk = ik < DK
    mv = iv < DV
    it = tl.arange(0, BT)
    # state (fp32, on chip for the whole sequence)
    M = tl.load(M0 + pid * DK * DV + ik[:, None] * DV + iv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    z = tl.load(Z0 + pid * DK + ik, mask=mk, other=0.0)
    dM_all = tl.zeros([BK, BV], dtype=tl.float32)
    dz_all = tl.zeros([BK], dtype=tl.float32)
    k_base = K + pid * T * DK
    v_base = V + pid * T * DV
    for b0 in range(0, T, block):
        b1 = tl.minimum(b0 + block, T)
        dM = tl.zeros([BK, BV], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
        for t0 in range(b0, b1, BT):
            rows = t0 + it
            mt = rows < b1
            k = tl.load(k_base + rows[:, None] * DK + ik[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
            v = tl.load(v_base + rows[:, None] * DV + iv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
            for g in tl.static_range(G):
                h = hkv * G + g
                q_base = Q + (b * H + h) * T * DK
                q = tl.load(q_base + rows[:, None] * DK + ik[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
                num = tl.dot(q, M, input_precision="ieee")                   # (BT, BV)
                den = tl.sum(q * z[None, :], axis=1) + eps                   # (BT,)
                o_base = O + (b * H + h) * T * DV
                tl.store(o_base + rows[:, None] * DV + iv[None, :], num / den[:, None], mask=mt[:, None] & mv[None, :])
            kz = tl.sum(k * z[None, :], axis=1)                             # (BT,)
            u = v
            if DELTA:
                u = v - tl.dot(k, M, input_precision="ieee") / (kz + eps)[:, None]
            if HAS_BETA:
                bt = tl.load(BETA + pid * T + rows, mask=mt, other=0.0)
                u = u * bt[:, None]
            dM += tl.dot(tl.trans(k), u, input_precision="ieee")             # (BK, BV)
            if NEW_INFO:
                kk = tl.sum(k * k, axis=1)
                gamma = tl.minimum(tl.maximum(1.0 - kz / (kk + eps), 0.0), 1.0)
                dz += tl.sum(k * gamma[:, None], axis=0)
            else:
                dz += tl.sum(k, axis=0)
        M += dM
        z += dz
        dM_all += dM
        dz_all += dz
    tl.store(DM + pid * DK * DV + ik[:, None] * DV + iv[None, :], dM_all, mask=mk[:, None] & mv[None, :])
    tl.store(DZ + pid * DK + ik, dz_all, mask=mk)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def _forward(q, k, v, M, z, beta, rule, z_rule, eps, block):
    B, H, T, dk = q.shape
    Hkv, dv = k.shape[1], v.shape[3]
    q, k, v, M, z = (x.detach().float().contiguous() for x in (q, k, v, M, z))
    bt = beta.detach().float().contiguous() if beta is not None else q.new_zeros(1)
    o = torch.empty(B, H, T, dv, device=q.device, dtype=torch.float32)
    dM = torch.empty(B, Hkv, dk, dv, device=q.device, dtype=torch.float32)
    dz = torch.empty(B, Hkv, dk, device=q.device, dtype=torch.float32)
    if B * Hkv == 0:
        return o, dM.zero_(), dz.zero_()
    _linear_memory_fwd[(B * Hkv,)](
        q, k, v, bt, M, z, o, dM, dz, T, min(block or max(T, 1), max(T, 1)), float(eps),
        H=H, HKV=Hkv, G=H // Hkv, DK=dk, DV=dv, BK=_pow2(dk), BV=_pow2(dv), BT=BT,
        DELTA=rule == "delta", NEW_INFO=z_rule == "new_info", HAS_BETA=beta is not None)
    return o, dM, dz


class _LinearMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, M, z, beta, rule, z_rule, eps, block):
        ctx.save_for_backward(q, k, v, M, z, beta)
        ctx.args = (rule, z_rule, eps, block)
        return _forward(q, k, v, M, z, beta, rule, z_rule, eps, block)

    @staticmethod
    def backward(ctx, go, gdM, gdz):
        q, k, v, M, z, beta = ctx.saved_tensors
        rule, z_rule, eps, block = ctx.args
        ins = [q, k, v, M, z] + ([beta] if beta is not None else [])
        need = [ctx.needs_input_grad[i] for i in range(len(ins))]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(n) for x, n in zip(ins, need)]
            outs = linear_memory_chunked(*leaves[:5], leaves[5] if beta is not None else None, rule=rule,
                                         z_rule=z_rule, eps=eps, block=block)
            pairs = [(o, g) for o, g in zip(outs, (go, gdM, gdz)) if g is not None and o.requires_grad]
            wrt = [x for x, n in zip(leaves, need) if n]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                         if pairs and wrt else [None] * len(wrt))
        out = [next(grads) if n else None for n in need]
        out += [None] * (6 - len(out))
        return (*out, None, None, None, None)


def linear_memory_triton(q: Tensor, k: Tensor, v: Tensor, M: Tensor, z: Tensor, beta: Tensor | None = None, *,
                         rule: str = "linear", z_rule: str = "sum", eps: float = 1e-6,
                         block: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    check_args(q, k, v, M, z, beta, rule, z_rule, block)
    return _LinearMemory.apply(q, k, v, M, z, beta, rule, z_rule, eps, block)
