"""MHA -> GQA / MQA conversion by pooling K/V heads (arXiv 2305.13245): the pooled weights against
an explicit per-head loop, exactness where the heads of a group agree, RoPE commuting with the
pooling, and the refusals."""
from __future__ import annotations

import pytest
import torch

from memstack.backbone import build_model
from memstack.backbone.gqa import convert_kv_heads, kv_bytes_per_token, pool_kv_weight
from memstack.backbone.layers import rope_tables
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.learned.config import MemoryTokensConfig, PrefixConfig
from tolerances import assert_close


def mha(**kw) -> BackboneConfig:
    return BackboneConfig(**{**dict(vocab_size=61, d_model=48, n_layers=2, n_heads=6, seg_len=16, init_std=0.2), **kw})


def _ref_pool(w: torch.Tensor, n_src: int, n_kv: int, method: str) -> torch.Tensor:
    """The obvious loop: new head g = mean (or first) of source heads g*r .. g*r+r-1."""
    hd = w.shape[0] // n_src
    r = n_src // n_kv
    heads = [w[i * hd:(i + 1) * hd] for i in range(n_src)]
    out = []
    for g in range(n_kv):
        group = heads[g * r:(g + 1) * r]
        if method == "mean":
            acc = torch.zeros_like(group[0])
            for h in group:
                acc = acc + h
            out.append(acc / r)
        else:
            out.append(group[0])
    return torch.cat(out, 0)


@pytest.mark.parametrize("n_src,n_kv", [(6, 3), (6, 2), (6, 1), (6, 6), (4, 2)])
@pytest.mark.parametrize("method", ["mean", "first"])
def test_pooled_weight_matches_the_per_head_loop(n_src, n_kv, method):
    w = torch.randn(n_src * 8, 48)
    assert_close(pool_kv_weight(w, n_src, n_kv, method), _ref_pool(w, n_src, n_kv, method))


def test_random_method_draws_fresh_weights_at_init_std():
    w = torch.randn(6 * 8, 48)
    out = pool_kv_weight(w, 6, 2, "random", init_std=0.05, generator=torch.Generator().manual_seed(1))
    assert out.shape == (16, 48)
    assert abs(float(out.std()) - 0.05) < 0.01
    assert not any(torch.allclose(out[:8], w[i * 8:(i + 1) * 8]) for i in range(6))


def test_converted_model_pools_every_layer_and_copies_the_rest():
    torch.manual_seed(0)
    model = build_model(mha())
    new = convert_kv_heads(model, 2)
    assert new.cfg.backbone.n_kv_heads == 2 and new.cfg.backbone.n_heads == 6
    src, dst = model.state_dict(), new.state_dict()
    assert set(src) == set(dst)
    for k in src:
        if k.endswith(("wk.weight", "wv.weight")):
            assert_close(dst[k], _ref_pool(src[k], 6, 2, "mean"))
        else:
            assert torch.equal(dst[k], src[k]), k
    # the source model is untouched
    assert model.cfg.backbone.kv_heads == 6 and model.blocks[0].attn.wk.weight.shape == (48, 48)


def test_identical_heads_in_a_group_convert_exactly():
    """If the heads of each group already share K/V weights, GQA computes exactly what MHA did."""
    torch.manual_seed(1)
    model = build_model(mha())
    with torch.no_grad():
        for blk in model.blocks:
            for w in (blk.attn.wk.weight, blk.attn.wv.weight):
                heads = w.view(6, 8, 48)
                heads.copy_(heads[::3].repeat_interleave(3, dim=0))      # groups {0,1,2}, {3,4,5}
    x = torch.randint(0, 61, (3, 16))
    want = model(x)[0].logits
    assert_close(convert_kv_heads(model, 2)(x)[0].logits, want)
    # MQA from those weights is *not* exact (two different groups averaged): a real change
    assert not torch.allclose(convert_kv_heads(model, 1)(x)[0].logits, want, atol=1e-4)


def test_pooled_keys_are_the_mean_of_the_groups_rotated_keys():
    """RoPE is linear and the same for every head, so pooling the projection = pooling the keys."""
    torch.manual_seed(2)
    model = build_model(mha())
    new = convert_kv_heads(model, 3)
    h = torch.randn(2, 10, 48)
    pos = torch.arange(5, 15).expand(2, -1)
    b = model.cfg.backbone
    cos, sin = rope_tables(pos, b.head_dim, b.rope_theta, h.dtype)
    k_mha, v_mha = model.blocks[1].attn.kv(h, cos, sin)                  # (2, 6, 10, 8)
    k_gqa, v_gqa = new.blocks[1].attn.kv(h, cos, sin)                    # (2, 3, 10, 8)
    assert_close(k_gqa, k_mha.view(2, 3, 2, 10, 8).mean(2))
    assert_close(v_gqa, v_mha.view(2, 3, 2, 10, 8).mean(2))


def test_already_grouped_model_converts_further():
    torch.manual_seed(3)
    base = build_model(mha())
    two_steps, direct = convert_kv_heads(convert_kv_heads(base, 3), 1), convert_kv_heads(base, 1)
    assert two_steps.cfg.backbone.kv_heads == 1
    for k, v in direct.state_dict().items():                               # mean of equal-size means
        assert_close(two_steps.state_dict()[k], v)
    model = build_model(mha(n_kv_heads=3))
    mqa = convert_kv_heads(model, 1)
    w = model.blocks[0].attn.wk.weight
    assert_close(mqa.blocks[0].attn.wk.weight, w.view(3, 8, 48).mean(0))


def test_memories_without_kv_shaped_parameters_are_carried():
    torch.manual_seed(4)
    model = build_model(ModelConfig(mha(), (MemoryTokensConfig(n_tokens=3),)))
    new = convert_kv_heads(model, 2)
    assert torch.equal(new.memory.memories[0].tokens, model.memory.memories[0].tokens)


def test_refusals_list_every_reason():
    model = build_model(ModelConfig(mha(), (PrefixConfig(n_prefix=2, reparam=False),)))
    with pytest.raises(ConfigError) as e:
        convert_kv_heads(model, 2)
    assert "memory.memories.0.kv" in str(e.value) and "train this memory again" in str(e.value)
    with pytest.raises(ConfigError) as e:
        convert_kv_heads(build_model(mha()), 4, method="median")
    assert len(e.value.reasons) == 2
    assert "must divide" in e.value.reasons[0] and "median" in e.value.reasons[1]
    with pytest.raises(ConfigError):
        convert_kv_heads(build_model(mha()), 0)


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(mha()) == 2 * 2 * 6 * 8 * 4
    assert kv_bytes_per_token(mha(n_kv_heads=1), dtype_bytes=2) == 2 * 2 * 1 * 8 * 2
