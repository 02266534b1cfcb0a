"""The converged suite end to end on a tiny random backbone (never the optional SmolLM2 asset):
`memstack bench` dispatches a `kind: converged` preset, every approach is measured, user rows
leak nothing (the differential is exactly zero), and forgetting a user is verified."""
from __future__ import annotations

import json

import pytest

from memstack.cli import main
from memstack.errors import ConfigError
from memstack.evals.converged import ConvergedConfig
from memstack.evals.personal_facts import user_facts

TINY = """kind: converged
name: converged_tiny
backbone: tiny
seg_len: 64
users: 2
facts_per_user: 1
mentions: 2
layers: [1]
rows_per_head: 31
user_rows_per_head: 257
lr: 0.5
steps: 10
drift_threshold: 0.5
heldout: 1
heldout_tokens: 32
latency_requests: 1
latency_new_tokens: 2
approaches: [base, in_context, rag, tables, tables_rag, lora]
lora_lr: 0.01
"""


def test_converged_suite_on_a_tiny_backbone(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert main(["bench", "--suite", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    (rec_path,) = (tmp_path / "r" / "converged_tiny").glob("*/record.json")
    rec = json.loads(rec_path.read_text())
    res = rec["results"]
    assert set(res) == {"base", "in_context", "rag", "tables", "tables_rag", "lora"}
    assert res["tables"]["differential_max_abs"] == 0.0            # other users' rows: exactly no effect
    assert res["tables"]["leak_recall"] == res["base"]["leak_recall"] == 0.0
    assert res["tables"]["recall@2"] > res["base"]["recall@2"]     # the user's rows learned its fact
    assert res["base"]["bytes_per_user"] == 0 and res["tables"]["bytes_per_user"] > 0
    assert res["tables"]["update_s"] > 0 and res["base"]["request_overhead"] == 0.0
    # a rank-8 adapter on q (64 -> 64) and v (64 -> 32) of 2 layers: 2 * 8 * (64 + 64 + 64 + 32) fp32 values
    assert res["lora"]["bytes_per_user"] == 2 * 8 * (64 + 64 + 64 + 32) * 4 and res["lora"]["request_s"] is None
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
        ConvergedConfig(users=1, steps=0, approaches=("tables", "full_ft"), addressing="prefix", identity_rows=0)
    msg = str(e.value)
    assert "users must be >= 2" in msg and "steps" in msg and "full_ft" in msg
    assert "'identity'" in msg and "identity_rows" in msg
