"""The converged suite end to end on a tiny random backbone (never the optional SmolLM2 asset):
`memstack bench` dispatches a `kind: converged` preset, hyperparameters are chosen on validation
users by the documented rule, every approach is measured on the test users, user rows and per-user
fine-tuned weights leak nothing (the differentials are exactly zero), and forgetting a user is
verified."""
from __future__ import annotations

import json

import pytest

from memstack.cli import main
from memstack.errors import ConfigError
from memstack.evals.converged import ConvergedConfig, build
from memstack.evals.converged_select import choose
from memstack.evals.personal_facts import user_facts
from memstack.evals.stats import wilson

TINY = """kind: converged
name: converged_tiny
backbone: tiny
seg_len: 64
users: 3
val_users: 2
facts_per_user: 1
mentions: 2
layers: [1]
rows_per_head: 31
user_rows_per_head: 257
lr_grid: [0.05, 0.5]
steps: 10
drift_threshold: 0.5
bpb_budget: 0.5
heldout: 1
heldout_tokens: 32
latency_requests: 1
latency_new_tokens: 2
approaches: [base, in_context, rag, tables, tables_rag, lora, full_ft]
lora_lr_grid: [0.001, 0.01]
ft_lr_grid: [0.0001, 0.001]
ft_users: 2
"""


def test_converged_suite_on_a_tiny_backbone(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert main(["bench", "--suite", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    (rec_path,) = (tmp_path / "r" / "converged_tiny").glob("*/record.json")
    rec = json.loads(rec_path.read_text())
    res = rec["results"]
    assert set(res) == {"base", "in_context", "rag", "tables", "tables_rag", "lora", "full_ft"}
    # choices: every grid point measured on the validation users, the chosen one by the rule
    val = rec["validation"]
    assert [c["lr"] for c in val["tables"]["candidates"]] == [0.05, 0.5]
    assert [c["lr"] for c in val["lora"]["candidates"]] == [0.001, 0.01]
    assert [c["lr"] for c in val["full_ft"]["candidates"]] == [0.0001, 0.001]
    for a in ("tables", "lora", "full_ft"):
        assert val[a]["selected_on_validation"] and val[a]["chosen"] == choose(val[a]["candidates"], 0.5)
    assert val["tables"]["chosen"]["recall"] == 1.0            # lr 0.05 learns nothing in 2 x 10 updates
    assert res["tables"]["differential_max_abs"] == 0.0            # other users' rows: exactly no effect
    assert res["full_ft"]["differential_max_abs"] == 0.0           # other users' fine-tuning: another copy
    assert res["tables"]["leak_recall"] == res["base"]["leak_recall"] == res["full_ft"]["leak_recall"] == 0.0
    assert res["tables"]["recall@2"] > res["base"]["recall@2"]     # the user's rows learned its fact
    st = res["tables"]["recall@2_stats"]
    assert st["n"] == 3 and st["k"] == round(3 * res["tables"]["recall@2"]) and st["ci95"] == list(wilson(st["k"], 3))
    assert res["base"]["bytes_per_user"] == 0 and res["tables"]["bytes_per_user"] > 0
    assert res["tables"]["update_s"] > 0 and res["base"]["request_overhead"] == 0.0
    # a rank-8 adapter on q (64 -> 64) and v (64 -> 32) of 2 layers: 2 * 8 * (64 + 64 + 64 + 32) fp32 values
    assert res["lora"]["bytes_per_user"] == 2 * 8 * (64 + 64 + 64 + 32) * 4 and res["lora"]["request_s"] is None
    # full fine-tuning on the first 2 test users: Adam moves every tensor, so the stored copy is the whole model
    _, plain, _ = build(ConvergedConfig(backbone="tiny", seg_len=64, layers=(1,), rows_per_head=31))
    assert res["full_ft"]["users"] == 2 and res["full_ft"]["recall@2_stats"]["n"] == 2
    assert res["full_ft"]["bytes_per_user"] == sum(p.numel() * 4 for p in plain.parameters())
    f = rec["forget_user0"]
    assert f == {"changed_before": True, "equal_to_fresh_after": True, "store_exists": False, "tables_dropped": 1,
                 "datastore_entries_removed": 1, "datastore_entries_left": 0}
    md = (rec_path.parent / "results.md").read_text()
    assert "command: `memstack bench --suite" in md and "| tables |" in md


def test_identity_addressing_on_a_tiny_backbone(tmp_path):
    """addressing=identity: each user's own key/value prefix rows (Prefix user_prefix), learned by
    the same serving code path; no leak, exactly zero differential, forgotten verifiably."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert main(["bench", "--suite", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "r"), "--no-progress",
                 "addressing=identity", "approaches=[base,tables]"]) == 0
    (rec_path,) = (tmp_path / "r" / "converged_tiny").glob("*/record.json")
    rec = json.loads(rec_path.read_text())
    res = rec["results"]
    assert rec["config"]["addressing"] == "identity"
    assert res["tables"]["differential_max_abs"] == 0.0 and res["tables"]["leak_recall"] == 0.0
    # every update writes all 32 rows of layer 1: (key, value) x 2 KV heads x head_dim 16, fp32
    assert rec["rows_written_per_update"] == 32 and res["tables"]["bytes_per_user"] == 32 * 2 * 2 * 16 * 4
    assert res["tables"]["bpb_change"] != 0.0                          # the rows were read
    f = rec["forget_user0"]
    assert f["changed_before"] and f["equal_to_fresh_after"] and not f["store_exists"] and f["tables_dropped"] == 1


def test_facts_are_distinct_real_names_and_configs_are_checked():
    users = user_facts(6, 3, seed=1)
    answers = [f.answer for fs in users for f in fs]
    assert len(answers) == len(set(answers)) == 18
    for fs in users:
        assert len({f.cue for f in fs}) == 3                          # distinct templates per user
        for f in fs:
            assert f.text == f"{f.cue}{f.answer}." and f.answer[1:2].isupper()
    with pytest.raises(ConfigError) as e:
        ConvergedConfig(users=1, steps=0, approaches=("tables", "finetune"), lr_grid=(0.1, float("nan")),
                        steps_grid=(0,), ft_users=3, lora_lr=-1.0, addressing="prefix", identity_rows=0)
    msg = str(e.value)
    for reason in ("users must be >= 2", "steps must be", "finetune", "lr_grid entries", "steps_grid entries",
                   "ft_users (3) must be at most users (1)", "lora_lr must be", "needs val_users >= 1",
                   "'identity'", "identity_rows"):
        assert reason in msg, reason
