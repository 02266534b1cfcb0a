"""Product-key memory: the product-key top-k equals brute force over all n_keys^2 keys, the read
equals a hand-written reference, values are shared across layers under Memory+."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.memory.base import StepContext
from memstack.memory.sparse.config import PKMConfig
from memstack.memory.sparse.pkm import product_key_topk
from tolerances import assert_close

BB = BackboneConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, seg_len=16)


def test_product_key_topk_equals_brute_force():
    heads, n_keys, half, knn = 3, 9, 5, 4
    keys = torch.randn(heads, 2, n_keys, half)
    q = torch.randn(7, heads, 2 * half)
    scores, rows = product_key_topk(q, keys, knn)
    full = (torch.einsum("bhd,hnd->bhn", q[..., :half], keys[:, 0])[..., :, None]
            + torch.einsum("bhd,hnd->bhn", q[..., half:], keys[:, 1])[..., None, :]).flatten(-2)  # (7, heads, n_keys^2)
    want_s, want_r = full.topk(knn, dim=-1)
    assert_close(scores, want_s)
    assert torch.equal(rows, want_r)


def test_read_matches_reference_and_values_are_shared():
    torch.manual_seed(0)
    model = build_model(ModelConfig(BB, (PKMConfig(layers=(0, 1), n_keys=6, k_dim=8, heads=2, knn=3),)))
    mem = model.memory.memories[0]
    assert mem.values.n_rows == 36                                   # one pool for both layers
    with torch.no_grad():
        for p in mem.parameters():
            p.add_(0.2 * torch.randn_like(p))
        h = torch.randn(2, 5, 32)
        ctx = StepContext(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2), torch.zeros(2, dtype=torch.bool), True, True, False)
        for layer in (0, 1):
            got, _ = mem.block(layer, h, None, ctx)
            rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731
            x = rms(h, mem.norm_x[layer].weight)
            q = rms((x @ mem.w_q[layer].weight.T).view(2, 5, 2, 8), mem.norm_q[layer].weight)
            s, r = product_key_topk(q, mem.keys[layer], 3)
            read = (F.softmax(s, -1)[..., None] * mem.values.weight[r]).sum((-3, -2))
            read = read * F.silu(x @ mem.w_g[layer].weight.T)
            assert_close(got, h + read @ mem.w_o[layer].weight.T)


def test_separate_pools_use_disjoint_rows():
    model = build_model(ModelConfig(BB, (PKMConfig(layers=(0, 1), n_keys=4, k_dim=4, heads=1, knn=2, shared_values=False),)))
    mem = model.memory.memories[0]
    assert mem.values.n_rows == 32
    x = torch.randn(3, 32)
    _, r0 = mem.lookup(0, x)
    _, r1 = mem.lookup(1, x)
    assert r0.max() < 16 and r1.min() >= 16
