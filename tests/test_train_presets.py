"""Every training preset in configs/train/ parses into a valid run config (memories valid on
its backbone, vocabulary matching the task)."""
from __future__ import annotations

from pathlib import Path

import pytest

from memstack.config import load_yaml
from memstack.train.run import run_config_from_dict

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_train_preset_parses(path):
    cfg = run_config_from_dict(load_yaml(path))
    assert cfg.task is not None and cfg.model.vocab_size == cfg.task.vocab_size()


def test_prefix_preset_tunes_a_frozen_backbone():
    cfg = run_config_from_dict(load_yaml(next(p for p in PRESETS if p.stem == "prefix_tune_tiny")))
    assert cfg.train.trainable == "memory" and cfg.init_from and [m.kind for m in cfg.memories] == ["prefix"]
