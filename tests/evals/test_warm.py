"""Warm starts: the plain backbone trained once per (task, seed), cached, verified, shared."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from memstack.config import BackboneConfig
from memstack.evals import warm as warm_mod
from memstack.evals.bench import SuiteConfig, cell_model, run_suite
from memstack.evals.mqar import MQARTaskConfig
from memstack.evals.slot_recall import SlotRecallTaskConfig
from memstack.evals.task import build_task
from memstack.evals.warm import WarmStartConfig, load_warm, warm_start, warm_cache_dir
from memstack.errors import CheckpointError, ConfigError
from memstack.train.config import TrainConfig

BACKBONE = BackboneConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, seg_len=16)
TASK = MQARTaskConfig(vocab=128, seq_len=32, num_kv_pairs=4, n_train=64, n_test=8)
TRAIN = TrainConfig(batch_size=4, n_segments=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTACK_DATA", str(tmp_path / "data"))
    return tmp_path


def run(task_cfg=TASK, steps=3, seg_len=None, seed=0, **kw):
    task = build_task(task_cfg, BACKBONE.seg_len)
    return warm_start(BACKBONE, task_cfg, task, WarmStartConfig(steps=steps, seg_len=seg_len), TRAIN, seed,
                      torch.device("cpu"), task.data_sha256(), log=lambda s: None, **kw)


def test_trained_once_then_loaded_identically_from_the_cache(cache):
    a = run()
    assert not a.meta["cached"] and a.meta["steps"] == 3 and (warm_cache_dir() / a.key / "config.json").is_file()
    b = run()
    assert b.meta["cached"] and b.key == a.key
    assert set(a.weights) == set(b.weights) and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not any(k.startswith("memory.") for k in a.weights)
    # the same training without the cache gives the same weights (training is deterministic)
    c = run(cache=False)
    assert all(torch.equal(a.weights[k], c.weights[k]) for k in a.weights)


def test_key_changes_with_everything_that_changes_the_weights(cache):
    base = run().key
    assert run(seed=1).key != base
    assert run(steps=4).key != base
    assert run(task_cfg=dataclasses.replace(TASK, seed=5)).key != base
    assert run(seg_len=32).key != base
    assert len({base, run().key}) == 1


def test_a_corrupted_cache_entry_is_trained_again_and_replaced(cache):
    a = run()
    root = warm_cache_dir() / a.key
    (weights,) = root.glob("model-*.safetensors")
    raw = bytearray(weights.read_bytes())
    raw[-8] ^= 0xFF                                       # flip bits in the tensor data
    weights.write_bytes(bytes(raw))
    logs = []
    task = build_task(TASK, BACKBONE.seg_len)
    b = warm_start(BACKBONE, TASK, task, WarmStartConfig(steps=3), TRAIN, 0, torch.device("cpu"), task.data_sha256(),
                   log=logs.append)
    assert not b.meta["cached"] and any("cached copy unusable" in x for x in logs)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert run().meta["cached"]


def test_window_longer_than_the_segment_trains_on_whole_examples(cache):
    """With seg_len 32 the plain backbone sees the whole 32-token example at once; its reference
    metrics are measured at that window."""
    w = run(seg_len=32, steps=2)
    assert w.meta["seg_len"] == 32 and w.meta["train_tokens"] == 2 * 4 * 32
    assert set(w.meta["metrics"]) == set(w.meta["metrics_val"]) >= {"acc"}


def test_a_wider_window_keeps_the_suite_layout_of_the_examples(cache):
    """slot_recall lays its examples out in the suite's segments (context segment, query segment):
    the warm start's wider window must see those same examples whole, not re-laid-out ones."""
    tc = SlotRecallTaskConfig(n_slots=2, n_values=4, n_noise=4, n_train=8, n_test=4)
    narrow, wide = build_task(tc, 16), build_task(tc, 32, 16)
    assert (narrow.train_data.inputs == wide.train_data.inputs).all() and narrow.train_data.inputs.shape == (8, 32)
    b = wide.train_source(4, 0).next(1)
    assert tuple(b.tokens.shape) == (4, 1, 32)               # one window over the whole example
    assert wide.context_tokens() == narrow.context_tokens() == 32


def test_cells_start_from_the_warm_backbone_and_their_memory_stays_fresh(cache):
    w = run()
    suite = SuiteConfig(backbone=BACKBONE, memories=("xl", "rmt"), tasks=(TASK,), train=TRAIN, device="cpu",
                        memory_configs={"xl": {"mem_len": 16}})
    for mem in suite.memory_list():
        m = cell_model(suite, TASK, mem, torch.device("cpu"), seed=0, warm=w)
        sd = m.state_dict()
        assert all(torch.equal(sd[k], t) for k, t in w.weights.items())
        fresh = cell_model(suite, TASK, mem, torch.device("cpu"), seed=0)
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items() if k.startswith("memory."))
    name, t = next(iter(w.weights.items()))
    with pytest.raises(CheckpointError) as e:
        load_warm(cell_model(suite, TASK, suite.memory_list()[0], torch.device("cpu")),
                  warm_mod.WarmStart("k", {"not.a.param": torch.zeros(1), name: t[..., :1]}, {}))
    assert "not.a.param: missing in the model" in str(e.value) and f"{name}: shape" in str(e.value)


def test_suite_with_warm_starts_records_them_and_refuses_unknown_labels(cache, tmp_path):
    task = SlotRecallTaskConfig(n_slots=2, n_values=4, n_noise=4, n_train=64, n_test=8)
    suite = SuiteConfig(backbone=BACKBONE, memories=("none", "xl"), tasks=(task,), train=TRAIN, lrs=(0.003,),
                        tokens_per_cell=2 * 4 * 32, seeds=(0, 1), device="cpu", memory_configs={"xl": {"mem_len": 16}},
                        warm_start={"slot_recall": WarmStartConfig(steps=2, seg_len=32)})
    logs = []
    rs = run_suite(suite, tmp_path / "out", progress=False, log=logs.append)
    assert [(r["memory"], r["seed"]) for r in rs] == [("none", 0), ("none", 1), ("xl", 0), ("xl", 1)]
    keys = {r["seed"]: r["warm_start"]["key"] for r in rs}
    assert keys[0] != keys[1] and all(r["warm_start"]["key"] == keys[r["seed"]] for r in rs)
    assert all(r["warm_start"]["seg_len"] == 32 and r["chance"] == 0.25 for r in rs)
    assert sum("warm start slot_recall" in x for x in logs) == 2
    rs2 = run_suite(suite, tmp_path / "again", progress=False, log=logs.append)   # identical, from the cache
    assert all(r2["warm_start"]["cached"] for r2 in rs2)
    assert [r["metrics"] for r in rs] == [r2["metrics"] for r2 in rs2]
    with pytest.raises(ConfigError, match="'lm' is not a task of the suite"):
        SuiteConfig(tasks=(task,), warm_start={"lm": WarmStartConfig(steps=1)})


def test_warm_start_task_changes_train_it_on_that_task_and_are_validated(cache):
    """`WarmStartConfig.task` trains the warm start on the task with those fields changed: the
    same weights and key as a warm start of the changed task itself; bad changes are refused."""
    short = dataclasses.replace(TASK, num_kv_pairs=2)
    task = build_task(TASK, BACKBONE.seg_len)
    via = warm_start(BACKBONE, TASK, task, WarmStartConfig(steps=3, task={"num_kv_pairs": 2}), TRAIN, 0,
                     torch.device("cpu"), task.data_sha256(), log=lambda s: None)
    direct = run(task_cfg=short)
    # the same task trains the same weights, under the same key (the second one came from the cache)
    assert via.key != run().key and via.key == direct.key and direct.meta["cached"]
    assert all(torch.equal(via.weights[k], direct.weights[k]) for k in direct.weights)
    assert via.meta["data_sha256"] == build_task(short, BACKBONE.seg_len).data_sha256()
    with pytest.raises(ConfigError) as e:
        SuiteConfig(tasks=(TASK,), warm_start={"mqar": WarmStartConfig(steps=1, task={"num_kv_pairs": "x", "nope": 1})})
    assert "warm_start.mqar.task" in str(e.value) and "nope" in str(e.value) and "num_kv_pairs" in str(e.value)
    with pytest.raises(ConfigError, match="kind"):
        WarmStartConfig(task={"kind": "lm"})
