"""Optimizer groups and the learning-rate schedule (memstack.train.optim)."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.learned.config import MemoryTokensConfig, XLConfig
from memstack.train.config import GroupConfig, TrainConfig
from memstack.train.optim import assign_groups, build_optimizer, lr_at, set_lr

from .toy_memory import GROUPED, ToyGroupedConfig, register

BB = BackboneConfig(vocab_size=67, d_model=16, n_layers=2, n_heads=2, seg_len=8)


# ----------------------------------------------------------------------------- schedule

def test_warmup_is_linear_from_lr_over_warmup_to_lr():
    cfg = TrainConfig(lr=2e-3, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.5e-3, 1e-3, 1.5e-3, 2e-3], rel=1e-12)
    assert lr_at(4, cfg) == pytest.approx(2e-3, rel=1e-12)         # cosine starts at the peak


def test_cosine_reaches_floor_at_max_steps_and_stays_there():
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, max_steps=110, min_lr_ratio=0.25)
    floor = 1e-2 * 0.25
    assert lr_at(110, cfg) == pytest.approx(floor, rel=1e-12)
    assert lr_at(500, cfg) == pytest.approx(floor, rel=1e-12)
    # halfway through the decay: the mean of peak and floor
    assert lr_at(60, cfg) == pytest.approx((1e-2 + floor) / 2, rel=1e-12)
    # an exact cosine value
    t = (85 - 10) / 100
    assert lr_at(85, cfg) == pytest.approx(floor + 0.5 * (1e-2 - floor) * (1 + math.cos(math.pi * t)), rel=1e-12)


def test_schedule_monotone_after_warmup_and_positive():
    cfg = TrainConfig(lr=3e-3, warmup_steps=7, max_steps=53, min_lr_ratio=0.0)
    lrs = [lr_at(s, cfg) for s in range(0, 60)]
    assert all(b >= a for a, b in zip(lrs[:7], lrs[1:8]))            # warmup increases
    after = lrs[7:]
    assert all(b <= a for a, b in zip(after, after[1:]))            # decay never increases
    assert max(lrs) == pytest.approx(3e-3, rel=1e-12)
    assert lrs[53] == pytest.approx(0.0, abs=1e-18)
    assert all(lr > 0 for lr in lrs[:53])


def test_no_warmup_starts_at_peak():
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(10, cfg) == pytest.approx(1e-4, rel=1e-12)


def test_warmup_longer_than_schedule_does_not_divide_by_zero():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=5)
    assert lr_at(4, cfg) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(10, cfg) == pytest.approx(1e-3, rel=1e-12)


# ----------------------------------------------------------------------------- groups

def _names(groups, g):
    return sorted(n for n, _ in groups.get(g, []))


def test_matrices_decay_norms_do_not_and_tied_embedding_counted_once():
    model = build_model(ModelConfig(BB, ()))
    assert model.lm_head.weight is model.tok_emb.weight
    groups = assign_groups(model)
    assert set(groups) == {"decay", "no_decay"}
    decay, no_decay = _names(groups, "decay"), _names(groups, "no_decay")
    assert "tok_emb.weight" in decay and "lm_head.weight" not in decay   # one parameter, one entry
    assert all(p.dim() >= 2 for _, p in groups["decay"])
    assert all(p.dim() == 1 for _, p in groups["no_decay"])
    assert no_decay == sorted(["norm.weight"] + [f"blocks.{i}.{n}.weight" for i in range(2)
                                                 for n in ("attn_norm", "mlp_norm")])
    assert {"blocks.0.attn.wq.weight", "blocks.1.attn.wo.weight"} <= set(decay)
    # every parameter exactly once
    all_ids = [id(p) for ps in groups.values() for _, p in ps]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    assert sum(p.numel() for ps in groups.values() for _, p in ps) == model.num_params()


def test_untied_head_is_its_own_decayed_matrix():
    model = build_model(ModelConfig(BackboneConfig(**{**BB.__dict__, "tie_embeddings": False}), ()))
    decay = _names(assign_groups(model), "decay")
    assert "tok_emb.weight" in decay and "lm_head.weight" in decay


def test_memory_tokens_are_not_decayed():
    model = build_model(ModelConfig(BB, (MemoryTokensConfig(n_tokens=3),)))
    groups = assign_groups(model)
    assert model.memory.memories[0].tokens.dim() == 2                 # a matrix, yet ...
    assert "memory.memories.0.tokens" in _names(groups, "no_decay")  # ... exempt from decay
    assert "memory.memories.0.tokens" not in _names(groups, "decay")
    opt = build_optimizer(model, TrainConfig(weight_decay=0.3))
    by_group = {g["group"]: g for g in opt.param_groups}
    assert by_group["decay"]["weight_decay"] == 0.3
    assert by_group["no_decay"]["weight_decay"] == 0.0
    assert any(p is model.memory.memories[0].tokens for p in by_group["no_decay"]["params"])


def test_frozen_parameters_are_left_out():
    model = build_model(ModelConfig(BB, ()))
    model.blocks[0].attn.wq.weight.requires_grad_(False)
    names = [n for ps in assign_groups(model).values() for n, _ in ps]
    assert "blocks.0.attn.wq.weight" not in names


@pytest.fixture
def grouped_model():
    remove = register(GROUPED)
    try:
        yield build_model(ModelConfig(BB, (XLConfig(mem_len=4), ToyGroupedConfig())))
    finally:
        remove()


def test_memory_optim_group_gets_its_own_group(grouped_model):
    groups = assign_groups(grouped_model)
    assert set(groups) == {"decay", "no_decay", "toy_table"}
    assert _names(groups, "toy_table") == ["memory.memories.1.table"]   # stack index 1, after xl
    assert "memory.memories.1.mix" in _names(groups, "decay")
    assert "memory.memories.1.gain" in _names(groups, "no_decay")


def test_named_group_lr_scale_and_default_no_decay(grouped_model):
    cfg = TrainConfig(lr=1e-3, weight_decay=0.2, groups={"toy_table": GroupConfig(lr_scale=10.0)})
    opt = build_optimizer(grouped_model, cfg)
    g = {x["group"]: x for x in opt.param_groups}
    assert set(g) == {"decay", "no_decay", "toy_table"}
    assert g["toy_table"]["weight_decay"] == 0.0          # a memory's own group defaults to no decay
    assert g["decay"]["weight_decay"] == 0.2
    assert g["toy_table"]["params"] == [grouped_model.memory.memories[1].table]
    assert g["toy_table"]["lr"] == pytest.approx(1e-2)
    set_lr(opt, 4e-4)
    assert g["toy_table"]["lr"] == pytest.approx(4e-3, rel=1e-12)
    assert g["decay"]["lr"] == pytest.approx(4e-4, rel=1e-12)
    assert g["no_decay"]["lr"] == pytest.approx(4e-4, rel=1e-12)


def test_named_group_explicit_weight_decay(grouped_model):
    cfg = TrainConfig(weight_decay=0.2, groups={"toy_table": GroupConfig(weight_decay=0.05)})
    g = {x["group"]: x for x in build_optimizer(grouped_model, cfg).param_groups}
    assert g["toy_table"]["weight_decay"] == 0.05
    assert g["toy_table"]["lr_scale"] == 1.0


def test_named_group_lr_scale_really_scales_the_update(grouped_model):
    """One AdamW step moves a parameter by ~lr (sign of the gradient); a 10x group moves 10x."""
    cfg = TrainConfig(lr=1e-3, weight_decay=0.0, groups={"toy_table": GroupConfig(lr_scale=10.0)})
    opt = build_optimizer(grouped_model, cfg)
    set_lr(opt, 1e-3)
    table, mix = grouped_model.memory.memories[1].table, grouped_model.memory.memories[1].mix
    before_t, before_m = table.detach().clone(), mix.detach().clone()
    table.grad = torch.ones_like(table)
    mix.grad = torch.ones_like(mix)
    opt.step()
    torch.testing.assert_close(before_t - table.detach(), torch.full_like(table, 1e-2), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(before_m - mix.detach(), torch.full_like(mix, 1e-3), rtol=1e-4, atol=1e-7)


def test_group_config_validation_lists_every_reason():
    with pytest.raises(ConfigError) as e:
        GroupConfig(lr_scale=0.0, weight_decay=-1.0)
    assert len(e.value.reasons) == 2
