"""Paged attention ops against their reference (and the reference against plain attention over
the same tokens laid out contiguously), at awkward lengths, starts mid-block, GQA, NaN-poisoned
workspaces. The Triton kernel runs under Triton's interpreter without a GPU."""
from __future__ import annotations

import pytest
import torch

from memstack.memory.kv.store import KVSpec, PagedKVCache
from memstack.ops.attention import attention_ref
from memstack.ops.paged_attention import (gather_kv, paged_decode_ref, paged_decode_torch, paged_prefill_ref,
                                          paged_prefill_sdpa)
from tolerances import assert_close


def setup_cache(B, Hkv, D, bs, lens, n_layers=2, layer=1, dtype=torch.float32):
    """A pool whose blocks are handed out in shuffled order; returns the per-layer views, block
    tables and the contiguous K/V of every sequence (what the pool must reproduce)."""
    spec = KVSpec(n_layers, Hkv, D, bs, dtype)
    need = [-(-n // bs) for n in lens]
    cache = PagedKVCache(spec, sum(need) + 3)
    perm = torch.randperm(cache.num_blocks).tolist()
    M = max(need)
    tables = torch.full((B, M), -1, dtype=torch.int32)
    dense = []
    for b, n in enumerate(lens):
        ids = [perm.pop() for _ in range(need[b])]
        tables[b, :need[b]] = torch.tensor(ids, dtype=torch.int32)
        k, v = torch.randn(n, Hkv, D, dtype=dtype), torch.randn(n, Hkv, D, dtype=dtype)
        slots = torch.tensor([ids[i // bs] * bs + i % bs for i in range(n)])
        cache.write(layer, slots, k, v)
        dense.append((k.transpose(0, 1), v.transpose(0, 1)))                     # (Hkv, n, D)
    kc, vc = cache.layer(layer)
    return kc, vc, tables, dense


CASES = [  # B, H, Hkv, D, bs, lens, starts
    (4, 6, 2, 24, 16, [1, 17, 40, 33], [0, 3, 16, 20]),
    (3, 4, 4, 16, 16, [16, 50, 7], [0, 0, 6]),
    (2, 8, 1, 8, 32, [70, 31], [35, 0]),
]


@pytest.mark.parametrize("B,H,Hkv,D,bs,lens,starts", CASES)
def test_reference_equals_contiguous_attention(B, H, Hkv, D, bs, lens, starts):
    kc, vc, tables, dense = setup_cache(B, Hkv, D, bs, lens)
    q = torch.randn(B, H, D)
    got = paged_decode_ref(q, kc, vc, tables, torch.tensor(starts), torch.tensor(lens))
    for b in range(B):
        k, v = dense[b]
        kk, vv = gather_kv(kc, vc, tables[b], starts[b], lens[b])
        assert torch.equal(kk, k[:, starts[b]:]) and torch.equal(vv, v[:, starts[b]:])
        S = lens[b] - starts[b]
        want = attention_ref(q[b][None, :, None], k[None, :, starts[b]:], v[None, :, starts[b]:],
                             torch.ones(1, 1, S, dtype=torch.bool))[0, :, 0]
        assert_close(got[b], want)


@pytest.mark.parametrize("B,H,Hkv,D,bs,lens,starts", CASES)
def test_torch_decode_equals_reference_forward_and_backward(B, H, Hkv, D, bs, lens, starts, poison_empty):
    kc, vc, tables, _ = setup_cache(B, Hkv, D, bs, lens)
    kc, vc = kc.detach().requires_grad_(), vc.detach().requires_grad_()
    q = torch.randn(B, H, D, requires_grad=True)
    st, ln = torch.tensor(starts), torch.tensor(lens)
    got = paged_decode_torch(q, kc, vc, tables, st, ln)
    want = paged_decode_ref(q, kc, vc, tables, st, ln)
    assert_close(got, want)
    with torch.no_grad():                                                         # the storage-gather fast path
        assert_close(paged_decode_torch(q, kc.detach(), vc.detach(), tables, st, ln), want)
    g = torch.randn_like(got)
    ga = torch.autograd.grad(got, (q, kc, vc), g)
    gb = torch.autograd.grad(want, (q, kc, vc), g)
    for a, b in zip(ga, gb):
        assert_close(a, b, grad=True)


@pytest.mark.parametrize("B,H,Hkv,D,bs,lens,starts", CASES)
@pytest.mark.parametrize("n_splits", [None, 1, 3])
def test_triton_decode_equals_reference(B, H, Hkv, D, bs, lens, starts, n_splits, poison_empty):
    from memstack.ops.paged_attention.triton_decode import paged_decode_triton

    kc, vc, tables, _ = setup_cache(B, Hkv, D, bs, lens)
    q = torch.randn(B, H, D)
    st, ln = torch.tensor(starts), torch.tensor(lens)
    got = paged_decode_triton(q, kc, vc, tables, st, ln, n_splits=n_splits)
    assert not got.isnan().any()
    assert_close(got, paged_decode_ref(q, kc, vc, tables, st, ln))


def test_triton_refuses_what_it_cannot_take():
    from memstack.ops.paged_attention.triton_decode import paged_decode_triton

    kc, vc, tables, _ = setup_cache(1, 2, 16, 8, [9])
    with pytest.raises(ValueError, match="block_size 8 is not a power of two >= 16"):
        paged_decode_triton(torch.randn(1, 4, 16), kc, vc, tables, torch.tensor([0]), torch.tensor([9]))


@pytest.mark.parametrize("T,start,end", [(1, 0, 1), (5, 0, 5), (7, 3, 37), (16, 16, 48), (20, 0, 33)])
def test_prefill_equals_reference_and_causal_dense(T, start, end, poison_empty):
    H, Hkv, D, bs = 6, 3, 16, 16
    kc, vc, tables, dense = setup_cache(1, Hkv, D, bs, [end])
    q = torch.randn(T, H, D)
    got = paged_prefill_sdpa(q, kc, vc, tables[0], start, end)
    ref = paged_prefill_ref(q, kc, vc, tables[0], start, end)
    assert_close(got, ref)
    k, v = dense[0]
    S = end - start
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None]                   # query i sees <= S-T+i
    want = attention_ref(q.transpose(0, 1)[None], k[None, :, start:], v[None, :, start:], mask)[0].transpose(0, 1)
    assert_close(ref, want)


def test_store_write_lands_in_the_right_slot():
    spec = KVSpec(3, 2, 4, 4)
    cache = PagedKVCache(spec, 5)
    k, v = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    cache.write(2, torch.tensor([9, 14]), k, v)                                   # block 2 slot 1, block 3 slot 2
    assert torch.equal(cache.kv[2, 2, 0, :, 1], k[0]) and torch.equal(cache.kv[3, 2, 1, :, 2], v[1])
    assert cache.kv.count_nonzero() == 2 * 2 * 2 * 4
    assert spec.block_bytes == 2 * 3 * 2 * 4 * 4 * 4
