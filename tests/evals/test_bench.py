"""The equal-budget harness (`run_suite`), best-of-sweep selection and the leaderboard report."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig, from_dict, load_yaml
from memstack.errors import ConfigError, MemstackError
from memstack.evals import bench
from memstack.evals.bench import SuiteConfig, best_of_sweep, run_suite
from memstack.evals.lm import LMTaskConfig
from memstack.evals.mqar import MQARTaskConfig
from memstack.evals.task import build_task
from memstack.evals.report import leaderboard_rows, text_table, write_report
from memstack.memory.learned.config import XLConfig
from memstack.registry import MEMORIES
from memstack.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PER_STEP = 4 * 1 * 16        # batch_size * n_segments * seg_len of the micro suite


def micro_suite(**kw) -> SuiteConfig:
    base = dict(name="micro", backbone=BackboneConfig(d_model=32, n_layers=2, n_heads=2, seg_len=16),
                memories=("none", "xl"), memory_configs={"xl": {"mem_len": 16}},
                tasks=(LMTaskConfig(tokenizer="byte", eval_tokens=2000),),
                train=TrainConfig(batch_size=4, n_segments=1, log_every=1), lrs=(0.003,),
                tokens_per_cell=4 * PER_STEP, time_budget_s=None, device="cpu")
    base.update(kw)
    return SuiteConfig(**base)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    logs: list[str] = []
    torch.manual_seed(0)
    records = run_suite(micro_suite(), out, progress=False, log=logs.append)
    return out, records, logs


# ------------------------------------------------------------------------------------ best_of_sweep

def rec(memory, task, lr, value, primary="acc", hib=True, val=None, **extra):
    """A record whose validation metric equals its test metric unless `val` is given."""
    return {"memory": memory, "task": task, "lr": lr, "metrics": {primary: value, "other": 123.0},
            "metrics_val": {primary: value if val is None else val},
            "primary": primary, "higher_is_better": hib, **extra}


def test_best_of_sweep_chooses_on_validation():
    """The test metric is what is reported, never what is chosen on."""
    rs = [rec("xl", "mqar", 1e-3, 0.9, val=0.2), rec("xl", "mqar", 3e-3, 0.5, val=0.6)]
    assert best_of_sweep(rs)[("xl", "mqar")]["lr"] == 3e-3


def test_best_of_sweep_higher_is_better():
    rs = [rec("xl", "mqar", 1e-3, 0.5), rec("xl", "mqar", 3e-3, 0.7), rec("xl", "mqar", 1e-2, 0.6)]
    best = best_of_sweep(rs)
    assert set(best) == {("xl", "mqar")}
    assert best[("xl", "mqar")]["lr"] == 3e-3


def test_best_of_sweep_lower_is_better():
    rs = [rec("none", "lm", 1e-3, 2.0, "bpb", False), rec("none", "lm", 3e-3, 1.5, "bpb", False),
          rec("none", "lm", 1e-2, 1.7, "bpb", False)]
    assert best_of_sweep(rs)[("none", "lm")]["lr"] == 3e-3


def test_best_of_sweep_ignores_nan_and_missing_metrics():
    rs = [rec("xl", "lm", 1e-2, math.nan, "bpb", False),        # a diverged run first
          rec("xl", "lm", 1e-3, 2.5, "bpb", False),
          rec("xl", "lm", 3e-3, math.nan, "bpb", False),        # ... and after
          {**rec("xl", "lm", 5e-3, 0.0, "bpb", False), "metrics": {}, "metrics_val": {}},   # no metric at all
          rec("none", "lm", 1e-3, math.nan, "bpb", False)]      # every lr diverged: no entry
    best = best_of_sweep(rs)
    assert set(best) == {("xl", "lm")}
    assert best[("xl", "lm")]["lr"] == 1e-3


def test_best_of_sweep_is_per_memory_and_task_and_keeps_the_first_of_ties():
    rs = [rec("xl", "mqar", 1e-3, 0.9), rec("xl", "mqar", 3e-3, 0.9), rec("none", "mqar", 1e-3, 0.1),
          rec("xl", "lm", 1e-3, 3.0, "bpb", False), rec("xl", "lm", 3e-3, 2.0, "bpb", False)]
    best = best_of_sweep(rs)
    assert set(best) == {("xl", "mqar"), ("none", "mqar"), ("xl", "lm")}
    assert best[("xl", "mqar")]["lr"] == 1e-3
    assert best[("none", "mqar")]["metrics"]["acc"] == 0.1
    assert best[("xl", "lm")]["lr"] == 3e-3


# ------------------------------------------------------------------------------------ run_suite

def test_run_suite_writes_one_record_per_cell(micro_run):
    out, records, logs = micro_run
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(records) == 2                     # 2 memories x 1 task x 1 lr
    on_disk = [json.loads(x) for x in lines]
    assert [r["memory"] for r in on_disk] == ["none", "xl"]
    assert on_disk == json.loads(json.dumps(records))
    assert any("2 cells" in x for x in logs)
    assert all(r["metrics_val"]["bpb"] != r["metrics"]["bpb"] for r in records)     # two splits evaluated


def test_run_suite_record_fields(micro_run):
    _, records, _ = micro_run
    for r in records:
        assert r["suite"] == "micro" and r["task"] == "lm" and r["lr"] == 0.003 and r["seed"] == 0
        assert r["seeds"] == [0] and r["warm_start"] is None and r["chance"] is None
        assert len(r["data_sha256"]) == 64 and r["data_sha256"] == build_task(micro_suite().tasks[0], 16).data_sha256()
        assert r["config"]["suite"]["name"] == "micro" and r["config"]["suite"]["tokens_per_cell"] == 4 * PER_STEP
        assert r["primary"] == "bpb" and r["higher_is_better"] is False
        # provenance
        assert isinstance(r["git_sha"], str) and r["git_sha"]
        assert r["git_sha"] == "unknown" or len(r["git_sha"].split("+")[0]) == 40
        assert r["device"].startswith("cpu") and r["device_type"] == "cpu"
        assert r["torch"] == torch.__version__
        for k in ("python", "numpy", "memstack", "platform"):
            assert r[k]
        # measurements
        assert r["tok_per_s"] > 0 and math.isfinite(r["tok_per_s"])
        assert r["peak_mem_mb"] > 0 and r["peak_mem_kind"] == "process_rss"
        assert r["wall_s"] > 0
        # the budget: exactly 4 steps of batch 4 x 1 segment x 16 tokens
        assert r["steps"] == 4 and r["train_tokens"] == 4 * PER_STEP
        assert r["budget_scale"] == 1.0 and r["tokens_per_cell"] == 4 * PER_STEP
        # quality
        m = r["metrics"]
        assert m["eval_tokens"] == 2000 and m["eval_bytes"] == 2000
        assert 0 < m["bpb"] < 9 and m["bpb"] == pytest.approx(m["loss"] / math.log(2))
        assert 0 < m["bpb_se"] < 0.2
        assert math.isfinite(r["train_loss"])
        # the config that produced it
        c = r["config"]
        assert set(c) == {"backbone", "memory", "task", "train", "suite"}
        assert c["backbone"]["vocab_size"] == 257 and c["backbone"]["d_model"] == 32 and c["backbone"]["seg_len"] == 16
        assert c["memory"]["kind"] == r["memory"]
        assert {k: c["task"][k] for k in ("kind", "corpus", "tokenizer", "eval_split", "eval_tokens")} == {
            "kind": "lm", "corpus": "sotu", "tokenizer": "byte", "eval_split": "test", "eval_tokens": 2000}
        assert c["train"]["lr"] == 0.003 and c["train"]["max_steps"] == 4 and c["train"]["batch_size"] == 4
    assert records[1]["config"]["memory"]["kind"] == "xl" and records[1]["config"]["memory"]["mem_len"] == 16


def test_save_models_keeps_every_cell_as_a_loadable_checkpoint(tmp_path):
    from memstack.train.run import load_for_inference

    rs = run_suite(micro_suite(memories=("xl",), tokens_per_cell=PER_STEP, save_models=True), tmp_path, progress=False,
                   log=lambda s: None)
    (r,) = rs
    assert r["checkpoint"] == str(tmp_path / "models" / "xl-lm-lr0.003-seed0")
    model, meta, _ = load_for_inference(r["checkpoint"], "cpu")
    assert model.memory.kinds == ["xl"] and meta["task"]["kind"] == "lm" and meta["seed"] == 0
    assert run_suite(micro_suite(memories=("none",), tokens_per_cell=PER_STEP), tmp_path / "b", progress=False,
                     log=lambda s: None)[0]["checkpoint"] is None


def test_run_suite_state_size(micro_run):
    _, records, _ = micro_run
    none, xl = records
    backbone = BackboneConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, seg_len=16)
    ctx = LMTaskConfig().context_tokens()
    assert none["state_size"] == 0 and none["state_bytes"] == 0 and none["memory_params"] == 0
    model = build_model(ModelConfig(backbone, (XLConfig(mem_len=16),)))
    assert xl["state_size_at_tokens"] == none["state_size_at_tokens"] == ctx
    assert xl["state_size"] == model.memory.state_size(ctx) > 0
    assert xl["state_bytes"] == model.memory.state_bytes(ctx)
    assert xl["params"] == model.num_params() == none["params"]   # XL adds no parameters


def test_write_report_from_run(micro_run, tmp_path):
    _, records, _ = micro_run
    table = write_report(records, tmp_path, command="memstack bench --suite micro")
    md = (tmp_path / "leaderboard.md").read_text()
    assert md.startswith("# Leaderboard: suite `micro`")
    assert "memstack bench --suite micro" in md
    assert torch.__version__ in md and records[0]["git_sha"] in md
    assert f"{4 * PER_STEP:,} training tokens per" in md and "scaled by" not in md
    for m in ("none", "xl"):
        met = records[0 if m == "none" else 1]["metrics"]
        assert f"| {m} | {met['bpb']:.3f} ± {met['bpb_se']:.3f} |" in md     # one seed: its evaluation error
    # leaderboard rows appear in the table, in the comparison with none and in "Every cell"
    assert sum(line.startswith("| none |") for line in md.splitlines()) == 3
    assert "chosen per (memory, task) on the validation split" in md and "seeds: [0]" in md
    for name in ("quality_vs_state_size.png", "bpb.png"):
        assert f"]({name})" in md
    check_pngs(tmp_path, ["quality_vs_state_size.png", "bpb.png"])
    assert not (tmp_path / "passkey_grid.png").exists()
    lines = table.splitlines()
    assert len(lines) == 2 + 2 + 2                              # header, rule, one line per memory, "", summary
    assert lines[5].startswith("lm: none ") and "0 memories >= 5 SE better" in lines[5]
    assert lines[0].split()[:4] == ["memory", "lm", "bpb", "↓"]
    assert "state size" in lines[0] and "tok/s vs none" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[0] == "none" and lines[3].split()[0] == "xl"
    assert lines[2].split()[-1] == "1.00x"
    assert lines[2].split()[4] == "0@4096" and lines[3].split()[4].endswith("@4096")


def check_pngs(folder: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    for name in names:
        p = folder / name
        assert p.read_bytes()[:8] == PNG_SIGNATURE, name
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and img.shape[2] in (3, 4)


def test_fit_budget_splits_time_between_training_and_evaluation():
    """2 memories (the plain backbone and one 3x slower) x 1 lr, 2 tasks whose evaluations take
    1 s and 3 s per split, 100 s left, 1000 tok/s: the cells cost (1 + 3) plain-equivalent runs, each
    evaluated on val and test, so training gets 100/SAFETY - 4*(1+3)*2 s, shared by 4 runs x 2 tasks."""
    suite = micro_suite(lrs=(0.003,))
    got = bench.fit_budget(suite, [1.0, 3.0], 1000.0, [1.0, 3.0], 100.0)
    assert got == int((100 / bench.SAFETY - 32) * 1000 / 8)
    # the same with two equal-speed memories affords more tokens per cell
    assert bench.fit_budget(suite, [1.0, 1.0], 1000.0, [1.0, 3.0], 100.0) == int((100 / bench.SAFETY - 16) * 1000 / 4)
    # ablation evaluates every model a third time
    got = bench.fit_budget(micro_suite(lrs=(0.003,), ablate=True), [1.0, 1.0], 1000.0, [1.0, 3.0], 100.0)
    assert got == int((100 / bench.SAFETY - 24) * 1000 / 4)
    # two seeds: twice the runs
    got = bench.fit_budget(micro_suite(lrs=(0.003,), seeds=(0, 1)), [1.0, 1.0], 1000.0, [1.0, 3.0], 100.0)
    assert got == int((100 / bench.SAFETY - 32) * 1000 / 8)
    assert bench.fit_budget(suite, [1.0, 3.0], 1000.0, [1.0, 3.0], 10.0) < 0      # evaluation alone overruns


def test_calibrate_measures_each_memory_against_the_plain_backbone():
    """Calibration times the plain backbone and every memory the same way; a memory is never
    budgeted as cheaper than the plain backbone, and `none` is the plain backbone itself."""
    suite = micro_suite(memories=("none", "xl", "memory_tokens"), tasks=(LMTaskConfig(tokenizer="byte", eval_tokens=300),))
    tasks = [build_task(tc, suite.backbone.seg_len) for tc in suite.tasks]
    tps, eval_s, slowdowns = bench.calibrate(suite, torch.device("cpu"), tasks, suite.memory_list())
    assert tps > 0 and len(eval_s) == 1 and eval_s[0] > 0
    assert len(slowdowns) == 3 and slowdowns[0] == 1.0 and all(r >= 1.0 for r in slowdowns)
    assert all(math.isfinite(r) for r in slowdowns)


def test_run_suite_time_budget_scales_tokens_for_every_memory(monkeypatch, tmp_path):
    """A fixed calibrated speed of 200 tok/s, free evaluation and a 20 s budget for 2 cells: each
    cell can afford 20 / SAFETY * 200 / 2 = 1739 tokens, so the 100k requested are scaled by ~0.017
    for both memories (27 steps of 64 tokens)."""
    calls = []

    def fake_calibrate(suite, device, tasks, mems):
        calls.append(([t.cfg.kind for t in tasks], [m.kind for m in mems]))
        return 200.0, [0.0], [1.0, 1.0]

    monkeypatch.setattr(bench, "calibrate", fake_calibrate)
    logs: list[str] = []
    suite = micro_suite(tokens_per_cell=100_000, time_budget_s=20.0,
                        tasks=(LMTaskConfig(tokenizer="byte", eval_tokens=300),))
    records = run_suite(suite, tmp_path, progress=False, log=logs.append)
    assert calls == [(["lm"], ["none", "xl"])]
    assert len(records) == 2
    tokens = records[0]["tokens_per_cell"]
    assert 1500 <= tokens <= int(20 / bench.SAFETY * 200 / 2)
    for r in records:
        assert r["tokens_per_cell"] == tokens
        assert 0 < r["budget_scale"] < 1
        assert r["budget_scale"] == records[0]["budget_scale"]
        assert 0 <= r["budget_scale"] * 100_000 - tokens < 1
        assert r["steps"] == tokens // PER_STEP
        assert r["train_tokens"] == r["steps"] * PER_STEP
    assert any("calibration" in x and "200 tok/s" in x for x in logs)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert all(json.loads(x)["budget_scale"] == records[0]["budget_scale"] for x in lines)
    write_report(records, tmp_path)
    assert "to fit the time budget" in (tmp_path / "leaderboard.md").read_text()


def test_run_suite_time_budget_larger_than_needed_keeps_the_budget(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "calibrate", lambda suite, device, tasks, mems: (1e9, [0.0], [1.0]))
    suite = micro_suite(memories=("none",), tokens_per_cell=PER_STEP, time_budget_s=100.0,
                        tasks=(LMTaskConfig(tokenizer="byte", eval_tokens=100),))
    (r,) = run_suite(suite, tmp_path, progress=False, log=lambda s: None)
    assert r["budget_scale"] == 1.0 and r["tokens_per_cell"] == PER_STEP and r["steps"] == 1


def test_run_suite_exhausted_time_budget_is_refused_with_the_reason(monkeypatch, tmp_path):
    """If calibration alone uses up the time budget, the suite is refused before any cell runs
    (never a negative or silently tiny budget), and no record is written."""

    def slow_calibrate(suite, device, tasks, mems):
        time.sleep(0.1)
        return 1000.0, [0.0], [1.0]

    monkeypatch.setattr(bench, "calibrate", slow_calibrate)
    suite = micro_suite(memories=("none",), tokens_per_cell=10_000, time_budget_s=0.01,
                        tasks=(LMTaskConfig(tokenizer="byte", eval_tokens=100),))
    with pytest.raises(ConfigError, match="time_budget_s=0.01 leaves 0 training tokens per cell"):
        run_suite(suite, tmp_path, progress=False, log=lambda s: None)
    assert not (tmp_path / "records.jsonl").exists()



# ------------------------------------------------------------------------------------ report on hand-made records

def fake_record(memory, task, lr, metrics, primary, hib, state_size, tok_per_s, **kw):
    return {"suite": "hand", "memory": memory, "task": task, "lr": lr, "seed": 0, "metrics": metrics,
            "metrics_val": kw.pop("metrics_val", metrics),
            "primary": primary, "higher_is_better": hib, "train_loss": 3.0, "steps": 10, "train_tokens": 1000,
            "tok_per_s": tok_per_s, "wall_s": 1.0, "peak_mem_mb": 100.0, "params": 12345, "memory_params": 0,
            "state_size": state_size, "state_size_at_tokens": 1024, "state_bytes": 4 * state_size,
            "config": {"backbone": {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": None, "seg_len": 16},
                       "task": kw.pop("task_cfg", {})},
            "device": "cpu", "torch": torch.__version__, "memstack": "0", "git_sha": "abc", "budget_scale": 0.25,
            "tokens_per_cell": 1000, **kw}


def test_report_on_hand_made_records(tmp_path):
    pk_cfg = {"lengths": [256, 512], "depths": [0.0, 1.0]}
    pk = lambda v: {"exact": v, **{f"exact@{L}/{d:g}": v for L in (256, 512) for d in (0.0, 1.0)},  # noqa: E731
                    "exact@256": v, "exact@512": v}
    rs = [fake_record("none", "lm", 1e-3, {"bpb": 2.0}, "bpb", False, 0, 1000.0),
          fake_record("none", "lm", 3e-3, {"bpb": 1.8}, "bpb", False, 0, 1200.0),
          fake_record("xl", "lm", 1e-3, {"bpb": 1.5}, "bpb", False, 2048, 400.0),
          fake_record("xl", "lm", 3e-3, {"bpb": math.nan}, "bpb", False, 2048, 500.0),
          fake_record("none", "mqar", 1e-3, {"acc": 0.1}, "acc", True, 0, 2000.0),
          fake_record("xl", "mqar", 1e-3, {"acc": 0.8}, "acc", True, 2048, 1000.0),
          fake_record("none", "passkey", 1e-3, pk(0.0), "exact", True, 0, 100.0, task_cfg=pk_cfg),
          fake_record("xl", "passkey", 1e-3, pk(0.5), "exact", True, 2_500_000, 50.0, task_cfg=pk_cfg)]
    header, rows = leaderboard_rows(rs)
    assert header == ["memory", "lm bpb ↓", "mqar acc ↑", "passkey exact ↑", "state size", "params", "tok/s vs none"]
    assert rows[0] == ["none", "1.800 (lr 0.003)", "0.100", "0.000", "0@1024", "12.3k", "1.00x"]
    # xl: best lm is lr 1e-3 (the NaN run is ignored); speed ratio vs the *best* none cell per task:
    # lm 400/1200, mqar 1000/2000, passkey 50/100 -> mean 0.444
    assert rows[1][:4] == ["xl", "1.500 (lr 0.001)", "0.800", "0.500"]
    assert rows[1][4] == "2.0k@1024, 2.5M@1024"
    assert rows[1][6] == f"{(400 / 1200 + 0.5 + 0.5) / 3:.2f}x"
    table = write_report(rs, tmp_path, command="memstack bench --suite hand")
    assert table.startswith(text_table(header, rows) + "\n")
    # no standard error anywhere (one seed, no evaluation error): no z, and one seed has no spread
    assert ("lm: none 1.800 ± 0.000; 0 memories >= 5 SE better: none; better than none beyond the seeds' "
            "spread: none") in table
    md = (tmp_path / "leaderboard.md").read_text()
    assert "scaled by 0.25 to fit the time budget" in md
    assert "| xl | lm | 0.001 |" in md and "| xl | lm | 0.003 |" in md    # every cell, NaN run included
    check_pngs(tmp_path, ["quality_vs_state_size.png", "bpb.png", "passkey_grid.png"])


def test_report_survives_a_task_where_every_run_diverged(tmp_path):
    """Every lr of a task diverging (NaN) is a result to report, not a crash after the whole suite
    ran: today the bpb bar chart calls min() on an empty list and the passkey grid indexes ms[0]."""
    pk_cfg = {"lengths": [256], "depths": [0.0]}
    rs = [fake_record("none", "lm", 1e-3, {"bpb": math.nan}, "bpb", False, 0, 100.0),
          fake_record("none", "mqar", 1e-3, {"acc": 0.5}, "acc", True, 0, 100.0),
          fake_record("none", "passkey", 1e-3, {"exact": math.nan}, "exact", True, 0, 100.0, task_cfg=pk_cfg)]
    table = write_report(rs, tmp_path)
    row = table.splitlines()[2].split()
    assert row[:2] == ["none", "-"]                           # lm: no valid run
    assert (tmp_path / "leaderboard.md").is_file()


# ------------------------------------------------------------------------------------ run_cell (trainer stubbed)

class StubTrainer:
    """Stands in for Trainer in run_cell: records what it was given, trains nothing."""

    seen: list = []

    def __init__(self, model, cfg, source, evaluate=None, dist=None, **kw):
        self.model, self.cfg = model, cfg
        self.step, self.tokens, self.train_time = cfg.max_steps, 123, 0.5
        StubTrainer.seen.append(self)

    def fit(self, progress=None):
        return {"loss": 1.0, "eval": {"acc": 0.25, "exact": 0.0}}


def test_run_cell_budget_arithmetic(monkeypatch):
    """Steps = tokens // (batch x segments per example x seg_len); warmup = warmup_frac of them;
    no evaluation or checkpoint during the cell."""
    monkeypatch.setattr(bench, "Trainer", StubTrainer)
    StubTrainer.seen = []
    task_cfg = MQARTaskConfig(vocab=128, seq_len=64, num_kv_pairs=4, n_train=16, n_test=4)
    suite = micro_suite(tasks=(task_cfg,), warmup_frac=0.25)
    mem = suite.memory_list()[1]
    env = bench.environment(torch.device("cpu"))
    r = bench.run_cell(suite, mem, task_cfg, 0.01, 10 * 256 + 255, torch.device("cpu"), env)
    (t,) = StubTrainer.seen
    assert t.cfg.lr == 0.01 and t.cfg.max_steps == 10 and t.cfg.warmup_steps == 2
    assert t.cfg.eval_every == 0 and t.cfg.ckpt_every == 0 and t.cfg.batch_size == 4
    assert r["steps"] == 10 and r["tok_per_s"] == 123 / 0.5
    assert set(r["metrics"]) == set(r["metrics_val"]) == {"acc", "exact"}     # evaluated on both splits
    assert r["state_size_at_tokens"] == 64 and r["config"]["train"]["max_steps"] == 10
    # a budget below one step still trains one step
    bench.run_cell(suite, mem, task_cfg, 0.01, 5, torch.device("cpu"), env)
    assert StubTrainer.seen[-1].cfg.max_steps == 1 and StubTrainer.seen[-1].cfg.warmup_steps == 1


def test_every_memory_starts_from_the_same_backbone_weights(monkeypatch):
    """Same backbone means the same initial backbone weights in every cell: a memory that draws
    random numbers for its own parameters must not shift the backbone's initialisation."""
    monkeypatch.setattr(bench, "Trainer", StubTrainer)
    StubTrainer.seen = []
    task_cfg = MQARTaskConfig(vocab=128, seq_len=64, num_kv_pairs=4, n_train=16, n_test=4)
    # retro's default 64-token chunk must divide the segment: a chunk that fits the micro backbone
    suite = micro_suite(memories=("all",), tasks=(task_cfg,), memory_configs={"xl": {"mem_len": 16}, "retro": {"chunk": 8}})
    env = bench.environment(torch.device("cpu"))
    for mem in suite.memory_list():
        bench.run_cell(suite, mem, task_cfg, 0.01, 256, torch.device("cpu"), env)
    ref = {k: v for k, v in StubTrainer.seen[0].model.state_dict().items() if not k.startswith("memory.")}
    for t in StubTrainer.seen[1:]:
        sd = t.model.state_dict()
        differ = [k for k, v in ref.items() if not torch.equal(sd[k], v)]
        assert not differ, f"{t.model.memory.kinds}: backbone init differs in {differ[:3]}"


# ------------------------------------------------------------------------------------ SuiteConfig

def test_suite_config_unknown_memory_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        SuiteConfig(memories=("nosuch", "xl"), tasks=(LMTaskConfig(),))
    (reason,) = e.value.reasons
    assert "nosuch" in reason
    for name in MEMORIES.names():
        assert name in reason
    assert "'xl'" not in reason


def test_suite_config_collects_every_reason():
    with pytest.raises(ConfigError) as e:
        SuiteConfig(memories=("nosuch",), exclude=("nope",), tasks=(), lrs=(), tokens_per_cell=0, time_budget_s=0)
    r = e.value.reasons
    assert len(r) == 6
    text = "\n".join(r)
    for word in ("task", "lrs", "tokens_per_cell", "time_budget_s", "'nosuch'", "'nope'"):
        assert word in text, word
    with pytest.raises(ConfigError) as e:
        SuiteConfig(tasks=(LMTaskConfig(),), lrs=(1e-3, -1.0))
    assert len(e.value.reasons) == 1 and "lrs" in e.value.reasons[0]


def test_suite_config_from_dict_reports_nested_problems():
    with pytest.raises(ConfigError) as e:
        from_dict(SuiteConfig, {"memories": ["nosuch"], "backbone": {"d_model": 30, "n_heads": 4},
                                "tasks": [{"kind": "mqar", "seq_len": 63}], "train": {"lr": -1}})
    text = str(e.value)
    assert "d_model (30)" in text and "even" in text and "lr must be > 0" in text


def test_suite_config_validates_memory_configs():
    """memory_configs are part of the suite: a typo in a memory name there, or a bad field, must
    be refused when the suite is built, not silently ignored (or found after calibration)."""
    with pytest.raises(ConfigError) as e:
        SuiteConfig(tasks=(LMTaskConfig(),), memory_configs={"XL": {"mem_len": 8}})
    assert "XL" in str(e.value)
    with pytest.raises(ConfigError) as e:
        SuiteConfig(tasks=(LMTaskConfig(),), memory_configs={"xl": {"mem_len": 0}})
    assert "mem_len" in str(e.value)


def test_suite_memory_list_all_exclude_and_configs():
    s = SuiteConfig(tasks=(LMTaskConfig(),), exclude=("kv_dense",), memory_configs={"xl": {"mem_len": 7}})
    mems = s.memory_list()
    assert [m.kind for m in mems] == [n for n in MEMORIES.names() if n != "kv_dense"]
    assert next(m for m in mems if m.kind == "xl").mem_len == 7


@pytest.mark.parametrize("preset", ["quick", "quick_lm", "longctx", "full", "learned"])
def test_bench_presets_parse(preset):
    data = load_yaml(REPO / "configs" / "bench" / f"{preset}.yaml")
    s = from_dict(SuiteConfig, data, what=preset)
    assert s.name == preset and s.tasks
    assert set(s.memory_configs) <= set(MEMORIES.names())     # no typo'd memory names
    mems = s.memory_list()
    assert {m.kind for m in mems} <= set(MEMORIES.names())
    for m in mems:                                             # the suite's settings reach the configs
        for k, v in s.memory_configs.get(m.kind, {}).items():
            got = getattr(m, k)
            assert (list(got) if isinstance(got, tuple) else got) == v
    if preset == "quick":   # a fixed budget (no time scaling), >= 2 seeds, warm starts for every task
        assert s.time_budget_s is None and len(s.seeds) >= 2
        assert set(s.warm_start) == {t.label for t in s.tasks}


def test_tokens_per_step_for_example_tasks():
    """Fixed-length examples set the segments per step (ceil(seq_len / seg_len))."""
    suite = micro_suite(tasks=(MQARTaskConfig(vocab=128, seq_len=64, num_kv_pairs=4, n_train=16, n_test=4),))
    from memstack.evals.task import build_task

    task = build_task(suite.tasks[0], 16)
    src = task.train_source(4, 0)
    assert bench._tokens_per_step(suite, task, src) == 4 * 4 * 16
