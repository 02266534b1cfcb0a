"""Row gather op: torch / Triton (interpreter on CPU) / reference agree forward, and the table
gradient is the same sparse COO tensor as autograd's dense gradient of plain indexing."""
from __future__ import annotations

import pytest
import torch

from memstack.ops import gather as G
from memstack.ops.gather import gather_rows, gather_rows_ref, gather_torch
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _default():
    G.set_impl(None)
    yield
    G.set_impl(None)


def _idx(n, rows, miss=True):
    idx = torch.randint(0, rows, (n,))
    if miss and n:
        idx[torch.rand(n) < 0.2] = -1
    return idx


@pytest.mark.parametrize("R,D,N", [(1, 1, 1), (7, 3, 5), (33, 17, 70), (100, 130, 19), (5, 64, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_impls_match_reference_forward(R, D, N, dtype, poison_empty):
    table = torch.randn(R, D).to(dtype)
    idx = _idx(N, R)
    ref = gather_rows_ref(table, idx)
    assert torch.equal(ref[idx < 0], torch.zeros_like(ref[idx < 0]))
    for impl in ("torch", "triton", "reference"):
        G.set_impl(impl)
        out = gather_rows(table, idx)
        assert out.shape == (N, D)
        assert torch.isfinite(out).all(), impl
        assert_close(out, ref, msg=impl)


def test_triton_kernel_on_strided_and_awkward_tiles(poison_empty):
    from memstack.ops.gather.triton import gather_rows_triton

    big = torch.randn(41, 300)
    table = big[:, 5:262]                                  # row stride 300, D = 257 (> one BLOCK_D tile)
    idx = _idx(37, 41)
    assert_close(gather_rows_triton(table, idx), gather_rows_ref(table, idx))


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_backward_is_sparse_and_equals_dense_autograd(impl):
    G.set_impl(impl)
    R, D = 23, 6
    w = torch.randn(R, D, requires_grad=True)
    idx = torch.tensor([[3, 3, -1], [22, 0, 3]])            # duplicates and a miss
    g_out = torch.randn(2, 3, D)
    (gather_rows(w, idx) * g_out).sum().backward()
    assert w.grad.is_sparse
    w2 = w.detach().clone().requires_grad_()
    valid = idx >= 0
    (w2[idx.clamp(min=0)] * g_out * valid[..., None]).sum().backward()
    assert_close(w.grad.to_dense(), w2.grad)
    assert w.grad.coalesce().indices()[0].tolist() == [0, 3, 22]   # only looked-up rows


def test_prefetched_rows_wire_the_gradient_to_the_table():
    w = torch.randn(9, 4, requires_grad=True)
    idx = torch.tensor([1, 8, 1])
    pre = gather_torch(w.detach(), idx)
    out = gather_rows(w, idx, prefetched=pre)
    assert torch.equal(out, w.detach()[idx])
    out.sum().backward()
    assert w.grad.is_sparse and w.grad.to_dense()[1].eq(2).all() and w.grad.to_dense()[8].eq(1).all()
