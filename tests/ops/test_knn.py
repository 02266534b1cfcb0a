"""ops/knn: the streamed search and the batched top-k attention against their references."""
from __future__ import annotations

import pytest
import torch

from memstack.ops.knn import knn_search, knn_search_ref, topk_attention, topk_attention_diff_ref, topk_attention_ref
from memstack.ops.knn.reference import pair_scores_ref
from tolerances import assert_close, tol


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("N,Q,d,k,chunk", [(1, 3, 5, 4, 7), (37, 5, 7, 5, 8), (300, 9, 16, 10, 64), (129, 2, 3, 129, 50)])
def test_knn_search_matches_reference(metric, N, Q, d, k, chunk, poison_empty):
    keys, q = torch.randn(N, d), torch.randn(Q, d)
    valid = torch.rand(N) > 0.3
    s, i = knn_search(q, keys, k, metric, valid, chunk=chunk)
    rs, ri = knn_search_ref(q, keys, k, metric, valid)
    assert_close(s, rs, dtype=torch.float32, msg="scores")
    # indices may differ only between exact ties: the true score of what came back must match
    exact = pair_scores_ref(q, keys, metric)
    got = torch.where(i >= 0, exact.gather(1, i.clamp(min=0)), torch.tensor(float("-inf"), dtype=torch.float64))
    assert_close(got.float(), rs, dtype=torch.float32)
    assert torch.equal(i >= 0, ri >= 0)
    assert bool(valid[i[i >= 0]].all()), "an invalid key was returned"
    assert int((i >= 0).sum(1).max()) == min(k, int(valid.sum()))


def test_knn_search_per_query_mask_and_cached_norms():
    keys, q = torch.randn(50, 8), torch.randn(6, 8)
    valid = torch.rand(6, 50) > 0.5
    s, i = knn_search(q, keys, 7, "l2", valid, key_sq=(keys ** 2).sum(-1), chunk=16)
    rs, _ = knn_search_ref(q, keys, 7, "l2", valid)
    assert_close(s, rs, dtype=torch.float32)
    for r in range(6):
        assert bool(valid[r, i[r][i[r] >= 0]].all())


@pytest.mark.parametrize("B,H,Hkv,T,C,D,k", [(2, 4, 2, 5, 11, 8, 3), (1, 2, 1, 3, 2, 4, 5), (2, 2, 2, 4, 9, 6, 9)])
def test_topk_attention_forward_and_backward(B, H, Hkv, T, C, D, k, poison_empty):
    q = torch.randn(B, H, T, D, requires_grad=True)
    mk, mv = torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D)
    valid = torch.rand(B, C) > 0.3
    valid[0] = False                                   # an empty memory row: no entry, zero output
    out, has, idx = topk_attention(q, mk, mv, valid, k, max_scores=37)   # tiny blocks: several per call
    ro, rh, ri = topk_attention_ref(q.detach(), mk, mv, valid, k)
    assert torch.equal(has, rh)
    assert torch.equal(idx.sort(-1).values, ri.sort(-1).values)
    assert_close(out.detach(), ro)
    assert not bool(out[0].abs().sum())
    g = torch.randn_like(out)
    (out * g).sum().backward()
    q2 = q.detach().clone().requires_grad_(True)
    (topk_attention_diff_ref(q2, mk, mv, valid, k) * g).sum().backward()
    assert_close(q.grad, q2.grad, grad=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_search_and_topk_attention_on_gpu_match_reference():
    keys, q = torch.randn(5000, 64), torch.randn(33, 64)
    s, i = knn_search(q.cuda(), keys.cuda(), 10, "l2", chunk=1024)
    rs, ri = knn_search_ref(q, keys, 10, "l2")
    torch.testing.assert_close(s.cpu(), rs, **tol(torch.float32))
    assert (i.cpu() == ri).float().mean() > 0.99
    qa, mk, mv = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    valid = torch.rand(2, 50) > 0.2
    out, _, _ = topk_attention(qa.cuda(), mk.cuda(), mv.cuda(), valid.cuda(), 8)
    assert_close(out.cpu(), topk_attention_ref(qa, mk, mv, valid, 8)[0], dtype=torch.float32)
