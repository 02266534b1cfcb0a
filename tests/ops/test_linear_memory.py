"""Associative-memory op: the torch chunkwise path and the Triton kernel (under Triton's
interpreter on CPU) against the per-token reference loop, forward and backward, at awkward sizes
(T not a multiple of the block or the kernel's 16-token tile, dk/dv not powers of two, GQA),
with NaN-poisoned allocations; plus hand-computed values and the op's error messages."""
from __future__ import annotations

import pytest
import torch

from memstack.ops import linear_memory as lm
from memstack.ops.linear_memory import linear_memory, linear_memory_chunked, linear_memory_ref, memory_read
from tolerances import assert_close


def make(B=2, H=4, Hkv=2, T=23, dk=7, dv=9, beta=True, state=True):
    """Non-negative features (as after ELU+1 / DPFP), a non-empty starting state."""
    q = torch.rand(B, H, T, dk).requires_grad_()
    k = torch.rand(B, Hkv, T, dk).requires_grad_()
    v = torch.randn(B, Hkv, T, dv).requires_grad_()
    M = (torch.randn(B, Hkv, dk, dv) * state).requires_grad_()
    z = (torch.rand(B, Hkv, dk) * 3 * state).requires_grad_()
    b = torch.rand(B, Hkv, T).requires_grad_() if beta else None
    return [q, k, v, M, z, b]


def run(fn, args, **kw):
    """Outputs and the gradients of a random linear function of all three outputs."""
    o, dM, dz = fn(*args, **kw)
    torch.manual_seed(1)
    loss = (o * torch.randn_like(o)).sum() + (dM * torch.randn_like(dM)).sum() + (dz * torch.randn_like(dz)).sum()
    ins = [a for a in args if a is not None]
    return (o, dM, dz), torch.autograd.grad(loss, ins)


def compare(fn, args, **kw):
    (o, dM, dz), grads = run(fn, args, **kw)
    (ro, rdM, rdz), rgrads = run(linear_memory_ref, args, **kw)
    for name, a, b in [("o", o, ro), ("dM", dM, rdM), ("dz", dz, rdz)]:
        assert torch.isfinite(a).all(), name
        assert_close(a, b, msg=name)
    names = ["dq", "dk", "dv", "dM0", "dz0", "dbeta"]
    for name, a, b in zip(names, grads, rgrads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, msg=name, grad=True)


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("z_rule", ["sum", "new_info"])
@pytest.mark.parametrize("block", [None, 1, 5])
@pytest.mark.parametrize("beta", [False, True], ids=["nobeta", "beta"])
def test_chunked_matches_reference_fwd_bwd(rule, z_rule, block, beta, poison_empty):
    compare(linear_memory_chunked, make(beta=beta), rule=rule, z_rule=z_rule, block=block)


@pytest.mark.parametrize("T,H,Hkv", [(1, 2, 2), (16, 1, 1), (37, 6, 2)])
def test_chunked_matches_reference_shapes(T, H, Hkv, poison_empty):
    compare(linear_memory_chunked, make(T=T, H=H, Hkv=Hkv, dk=5, dv=3), rule="delta", z_rule="new_info", block=6)


@pytest.mark.parametrize("rule,z_rule,block", [("linear", "sum", 5), ("delta", "new_info", 7), ("delta", "sum", None),
                                                ("linear", "new_info", 3)])
def test_triton_kernel_matches_reference_fwd_bwd(rule, z_rule, block, poison_empty):
    """Forward is the Triton kernel; backward recomputes through the torch chunkwise path."""
    from memstack.ops.linear_memory.triton import linear_memory_triton

    compare(linear_memory_triton, make(T=21, dk=7, dv=17, beta=block != 3), rule=rule, z_rule=z_rule, block=block)
    assert poison_empty.count >= 3   # the kernel's outputs were allocated poisoned, and fully overwritten


def test_triton_kernel_tiles_and_blocks_misaligned(poison_empty):
    """A block boundary inside a 16-token tile, a tail tile, 3 query heads per kv head, no state."""
    from memstack.ops.linear_memory.triton import linear_memory_triton

    compare(linear_memory_triton, make(B=1, H=3, Hkv=1, T=35, dk=20, dv=5, state=False), rule="delta",
            z_rule="sum", block=11)
    assert poison_empty.count >= 3


def test_hand_computed_two_tokens():
    """block=1: the second token reads exactly what the first wrote."""
    q = torch.tensor([[[[1.0, 2.0], [0.5, 1.0]]]])                 # (1,1,2,2)
    k = torch.tensor([[[[2.0, 1.0], [1.0, 0.0]]]])
    v = torch.tensor([[[[3.0], [5.0]]]])                            # (1,1,2,1)
    M, z = torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2)
    for fn in (linear_memory_ref, linear_memory_chunked):
        o, dM, dz = fn(q, k, v, M, z, rule="linear", block=1, eps=0.0 + 1e-12)
        # token 0 reads an empty memory: 0 / (0 + eps) = 0
        assert o[0, 0, 0, 0] == 0
        # token 1 reads k0^T v0 = [[6],[3]] normalised by q1 . k0 = 0.5*2 + 1*1 = 2: (0.5*6 + 1*3) / 2 = 3
        assert_close(o[0, 0, 1], torch.tensor([3.0]))
        assert_close(dM[0, 0], torch.tensor([[6.0 + 5.0], [3.0]]))  # k0^T v0 + k1^T v1
        assert_close(dz[0, 0], torch.tensor([3.0, 1.0]))
        # delta rule: token 1's value is corrected by what k1 retrieves: k1 M / (k1 z) = 6 / 2 = 3 -> 5 - 3
        o, dM, dz = fn(q, k, v, M, z, rule="delta", block=1, eps=1e-12)
        assert_close(dM[0, 0], torch.tensor([[6.0 + 2.0], [3.0]]))
        # ARMT's new-information z: gamma_1 = 1 - k1.z / |k1|^2 = 1 - 2/1 -> clipped to 0
        o, dM, dz = fn(q, k, v, M, z, rule="delta", z_rule="new_info", block=1, eps=1e-12)
        assert_close(dz[0, 0], torch.tensor([2.0, 1.0]))


def test_one_block_reads_only_the_starting_state():
    """block=None: no token sees another's write; the reads are memory_read of the starting state."""
    q, k, v, M, z, b = make(state=True)
    o, dM, dz = linear_memory_chunked(q, k, v, M, z, b, rule="delta")
    assert_close(o, memory_read(q, M, z))
    o2, _, _ = linear_memory_chunked(q, k * 0 + 5.0, v * 3, M, z, b, rule="delta")
    assert torch.equal(o, o2)


def test_empty_sequence():
    q, k, v, M, z, b = make(T=0)
    for fn in (linear_memory_ref, linear_memory_chunked):
        o, dM, dz = fn(q, k, v, M, z, b)
        assert o.shape == (2, 4, 0, 9) and not dM.any() and not dz.any()


def test_bad_arguments_list_every_reason():
    q, k, v, M, z, b = make()
    with pytest.raises(ValueError) as e:
        linear_memory(q[:, :3], k, v[:, :, :4], M, z[..., :2], b, rule="fast", z_rule="max", block=0)
    msg = str(e.value)
    for part in ["multiple of kv heads", "v must be", "z must be", "rule must be", "z_rule must be", "block must be"]:
        assert part in msg, part


def test_dispatch_and_set_impl():
    q, k, v, M, z, b = make(T=5)
    try:
        lm.set_impl("reference")
        ref = linear_memory(q, k, v, M, z, b, rule="delta")
        lm.set_impl(None)
        fast = linear_memory(q, k, v, M, z, b, rule="delta")
    finally:
        lm.set_impl(None)
    for a, r in zip(fast, ref):
        assert_close(a, r)
    with pytest.raises(ValueError, match="valid"):
        lm.set_impl("cuda-magic")


def test_fp32_under_low_precision_inputs():
    """bf16 inputs: the op still accumulates in fp32 (outputs fp32, equal to the fp32 op on the
    rounded inputs)."""
    q, k, v, M, z, _ = make(T=9, beta=False)
    args16 = [t.detach().bfloat16() for t in (q, k, v)]
    o, dM, dz = linear_memory_chunked(*args16, M.detach(), z.detach())
    ro, rdM, rdz = linear_memory_ref(*(t.float() for t in args16), M.detach(), z.detach())
    assert o.dtype == dM.dtype == dz.dtype == torch.float32
    assert_close(o, ro)
    assert_close(dM, rdM)
