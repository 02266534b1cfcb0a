"""The learned family's presets parse and validate, and the `learned` suite lists both
segment-level retrieval variants under distinct names (records are keyed by task label)."""
from __future__ import annotations

from pathlib import Path

import pytest

from memstack.config import from_dict, load_yaml
from memstack.evals.bench import SuiteConfig
from memstack.evals.segment_ar import SegmentARTaskConfig
from memstack.train.run import run_config_from_dict

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["rmt_tiny", "armt_tiny", "infini_tiny", "hmt_tiny"])
def test_train_presets_validate(name):
    cfg = run_config_from_dict(load_yaml(REPO / "configs" / "train" / f"{name}.yaml"))
    assert cfg.memories[0].kind == name.split("_")[0]


def test_learned_suite_validates_and_names_task_variants_apart():
    suite = from_dict(SuiteConfig, load_yaml(REPO / "configs" / "bench" / "learned.yaml"))
    assert {m.kind for m in suite.memory_list()} >= {"none", "memory_tokens", "xl", "rmt", "armt", "infini", "hmt"}
    labels = [t.label for t in suite.tasks]
    assert len(labels) == len(set(labels)) and "segment_ar_rewrite" in labels
    assert SegmentARTaskConfig().label == "segment_ar"


def test_quick_suite_configures_the_learned_memories():
    # Infini-attention left quick (at chance on slot_recall at its budget; quick.yaml says so): the learned suite has it
    suite = from_dict(SuiteConfig, load_yaml(REPO / "configs" / "bench" / "quick.yaml"))
    assert {"rmt", "armt", "hmt", "lm2"} <= set(suite.memory_configs)
    assert {"rmt", "armt", "hmt", "lm2"} <= {m.kind for m in suite.memory_list()}
    learned = from_dict(SuiteConfig, load_yaml(REPO / "configs" / "bench" / "learned.yaml"))
    assert {"rmt", "armt", "infini", "hmt"} <= {m.kind for m in learned.memory_list()}
