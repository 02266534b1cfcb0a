"""The converged suite's parts, on values: the validation / test split of simulated users, the
selection rule, recall's interval, and full fine-tuning per user (what is stored, what a reload
gives back, that one user's training leaves every other user's weights and the base untouched)."""
from __future__ import annotations

import math

import pytest
import torch

from memstack.evals.converged import ConvergedConfig, build
from memstack.evals.converged_ft import FullFineTune
from memstack.evals.converged_select import choose
from memstack.evals.personal_facts import split_users
from memstack.evals.stats import proportion, wilson


def test_split_is_disjoint_deterministic_and_renumbered():
    val, test = split_users(3, 5, 2, seed=0)
    assert (len(val), len(test)) == (3, 5)
    assert split_users(3, 5, 2, seed=0) == (val, test)                      # deterministic
    assert split_users(3, 5, 2, seed=1) != (val, test)                      # the seed matters
    va = {f.answer for fs in val for f in fs}
    ta = {f.answer for fs in test for f in fs}
    assert len(va) == 6 and len(ta) == 10 and not va & ta                   # no answer on both sides
    for side in (val, test):
        assert [fs[0].user for fs in side] == list(range(len(side)))
        assert all(f.user == fs[0].user for fs in side for f in fs)
    # the 8 users are the same 8 as one stream of 8 (only their order and numbering differ)
    from memstack.evals.personal_facts import user_facts
    assert va | ta == {f.answer for fs in user_facts(8, 2, 0) for f in fs}
    with pytest.raises(ValueError):
        split_users(1, 0, 2)


def test_choose_prefers_recall_within_the_budget():
    c = [{"lr": 1, "recall": 0.9, "bpb_change": 0.02},          # best recall, over the budget
         {"lr": 2, "recall": 0.7, "bpb_change": 0.005},
         {"lr": 3, "recall": 0.7, "bpb_change": 0.001},          # same recall, smaller rise: wins the tie
         {"lr": 4, "recall": 0.5, "bpb_change": -0.01}]
    assert choose(c, 0.01)["lr"] == 3
    assert choose(c, 0.05)["lr"] == 1
    # nothing within the budget: the smallest rise
    assert choose([{"lr": 1, "recall": 1.0, "bpb_change": 0.3}, {"lr": 2, "recall": 0.0, "bpb_change": 0.2}],
                  0.01)["lr"] == 2
    with pytest.raises(ValueError):
        choose([], 0.01)


def test_wilson_and_proportion_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and math.isclose(hi, 0.27753, abs_tol=1e-4)
    lo, hi = wilson(5, 10)
    assert math.isclose(lo, 0.23659, abs_tol=1e-4) and math.isclose(hi, 0.76341, abs_tol=1e-4)
    lo, hi = wilson(10, 10)
    assert math.isclose(lo, 0.72247, abs_tol=1e-4) and hi == 1.0
    st = proportion([True, True, False, True], groups=[0, 0, 1, 1])
    assert (st["k"], st["n"], st["mean"]) == (3, 4, 0.75)
    assert math.isclose(st["se"], math.sqrt(0.75 * 0.25 / 4))
    # user means 1.0 and 0.5: sd 0.35355, over sqrt(2) users
    assert st["groups"] == 2 and math.isclose(st["se_groups"], math.sqrt(0.125) / math.sqrt(2))


def test_full_fine_tuning_stores_what_changed_and_reloads_it_exactly(tmp_path):
    _, plain, tok = build(ConvergedConfig(backbone="tiny", seg_len=64, layers=(1,), rows_per_head=31))
    base = {n: p.detach().clone() for n, p in plain.named_parameters()}
    ids = [tok.eot_id] + tok.encode("My best friend is Ada")
    base_logits = FullFineTune(plain, 1e-3, 1, tmp_path / "x").logits("nobody", ids)   # nothing stored: the base
    ft = FullFineTune(plain, 1e-3, 3, tmp_path / "ft")
    ft.learn("a", [[tok.eot_id] + tok.encode("My best friend is Ada Lovelace.")])
    a_logits = ft.logits("a", ids)
    nbytes = ft.save("a")
    changed = {n for n, p in ft.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed and nbytes == sum(base[n].numel() * 4 for n in changed)
    assert not torch.equal(a_logits, base_logits)
    ft.learn("b", [[tok.eot_id] + tok.encode("I grew up in Lisbon.")])      # another user, the same copy
    ft.save("b")
    other = FullFineTune(plain, 1e-3, 3, tmp_path / "ft")                   # a fresh process's view
    assert torch.equal(other.logits("a", ids), a_logits)                    # a's weights, bit for bit
    assert not torch.equal(other.logits("b", ids), a_logits)
    for n, p in plain.named_parameters():                                   # the served base: untouched
        assert torch.equal(p, base[n]), n
    ft.drop("a")
    assert not ft.path("a").exists() and torch.equal(ft.logits("a", ids), base_logits)


def test_choices_are_reused_only_for_the_same_configuration(tmp_path):
    from memstack.errors import ConfigError
    from memstack.evals.converged_select import load_choices, save_choices

    cfg = ConvergedConfig(backbone="tiny", users=3, val_users=2, lr_grid=(0.1, 1.0), approaches=("base", "tables", "lora"))
    choices = {"tables": {"chosen": {"lr": 1.0, "steps": 5}}, "lora": {"chosen": {"lr": 1e-3, "steps": 5}}}
    save_choices(tmp_path / "v.json", cfg, choices)
    assert load_choices(tmp_path / "v.json", cfg) == choices
    # latency settings and the approaches run do not matter; a test user more, another grid or seed does
    same = ConvergedConfig(backbone="tiny", users=3, val_users=2, lr_grid=(0.1, 1.0), approaches=("tables",),
                           latency_requests=9)
    assert load_choices(tmp_path / "v.json", same) == {"tables": choices["tables"]}
    other = ConvergedConfig(backbone="tiny", users=4, val_users=2, lr_grid=(0.1, 2.0), seed=3,
                            approaches=("tables", "full_ft"))
    with pytest.raises(ConfigError) as e:
        load_choices(tmp_path / "v.json", other)
    msg = str(e.value)
    for reason in ("users was 3 there, 4 here", "lr_grid was [0.1, 1.0] there, [0.1, 2.0] here",
                   "seed was 0 there, 3 here", "no choice for full_ft there"):
        assert reason in msg, reason
    with pytest.raises(ConfigError, match="is not a file"):
        load_choices(tmp_path / "missing.json", cfg)
    # a file written before the `knowledge` field existed: it had the default there (no knowledge table)
    import json

    doc = json.loads((tmp_path / "v.json").read_text())
    del doc["config"]["knowledge"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert load_choices(tmp_path / "old.json", cfg) == choices
    (tmp_path / "kn").mkdir()
    (tmp_path / "kn" / "adapter.json").write_text("{}")
    with pytest.raises(ConfigError) as e:                # choices made without the table are not reused with it
        load_choices(tmp_path / "old.json", ConvergedConfig(backbone="tiny", users=3, val_users=2, lr_grid=(0.1, 1.0),
                                                             approaches=("tables",), knowledge=str(tmp_path / "kn")))
    assert "knowledge was '' there" in str(e.value)


@pytest.mark.parametrize("preset", ["converged_cpu", "converged"])
def test_converged_presets_parse_and_choose_on_validation(preset):
    from pathlib import Path

    from memstack.config import from_dict, load_yaml

    data = load_yaml(Path(__file__).parents[2] / "configs" / "bench" / f"{preset}.yaml")
    assert data.pop("kind") == "converged"
    cfg = from_dict(ConvergedConfig, data, what=preset)
    assert cfg.name == preset and cfg.val_users >= 4 and cfg.users >= 8 and cfg.facts_per_user >= 3
    assert len(cfg.lr_grid) > 1 and len(cfg.steps_grid) > 1 and len(cfg.lora_lr_grid) > 1 and len(cfg.ft_lr_grid) > 1
    assert set(cfg.approaches) == {"base", "in_context", "rag", "tables", "tables_rag", "lora", "full_ft"}


def test_knowledge_adapter_loads_into_the_model_and_a_misfit_is_refused_with_every_difference(tmp_path):
    from memstack.adapters import memory_tensors, save_adapter
    from memstack.errors import CheckpointError

    cfg = ConvergedConfig(backbone="tiny", seg_len=64, layers=(1,), rows_per_head=31)
    trained, _, _ = build(cfg)
    with torch.no_grad():                            # stands in for a retrofit: every memory tensor moves
        for t in memory_tensors(trained).values():
            if t.is_floating_point():                # (integer buffers: hash multipliers, kept)
                t.add_(torch.randn_like(t))
    save_adapter(trained, tmp_path / "knowledge")
    model, plain, _ = build(ConvergedConfig(backbone="tiny", seg_len=64, layers=(1,), rows_per_head=31,
                                            knowledge=str(tmp_path / "knowledge")))
    want, got = memory_tensors(trained), memory_tensors(model)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    fresh, _, _ = build(cfg)
    x = torch.randint(0, 256, (1, 24))
    assert torch.equal(plain(x)[0].logits, fresh.without_memories([0])(x)[0].logits)   # the backbone is untouched
    assert not torch.equal(model(x)[0].logits, fresh(x)[0].logits)
    with pytest.raises(CheckpointError) as e:        # another table size and another layer: both listed
        build(ConvergedConfig(backbone="tiny", seg_len=64, layers=(0,), rows_per_head=61,
                              knowledge=str(tmp_path / "knowledge")))
    assert "rows_per_head" in str(e.value) and "layers" in str(e.value)
    from memstack.errors import ConfigError

    with pytest.raises(ConfigError) as e:            # both reasons at once
        ConvergedConfig(backbone="tiny", addressing="product_key", knowledge=str(tmp_path / "nowhere"))
    assert "needs addressing 'hashed'" in str(e.value) and "adapter directory" in str(e.value)
