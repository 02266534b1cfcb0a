"""The `memstack` command line, called in-process through `main(argv)` (and twice as a subprocess)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from memstack.cli import main
from memstack.registry import MEMORIES, TASKS

REPO = Path(__file__).resolve().parents[1]

TINY_RUN = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seg_len": 16},
    "memories": [{"kind": "xl", "mem_len": 16}],
    "task": {"kind": "lm", "corpus": "sotu", "tokenizer": "byte", "eval_split": "val", "eval_tokens": 1000},
    "train": {"lr": 0.003, "max_steps": 3, "warmup_steps": 1, "batch_size": 2, "n_segments": 2, "log_every": 1},
    "device": "cpu",
}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def json_head(stdout: str) -> dict:
    """The JSON object a command prints first (train prints a 'checkpoint:' line after it)."""
    obj, _ = json.JSONDecoder().raw_decode(stdout.lstrip())
    return obj


def memstack_exe() -> str:
    exe = Path(sys.executable).parent / "memstack"
    return str(exe) if exe.exists() else shutil.which("memstack") or ""


# ------------------------------------------------------------------------------------ list

def test_list_json(capsys):
    rc, out, err = run(["list", "--json"], capsys)
    assert rc == 0 and err == ""
    data = json.loads(out)
    mems = {m["name"]: m for m in data["memories"]}
    assert {"none", "memory_tokens", "xl", "kv_dense"} <= set(mems)
    assert set(mems) == set(MEMORIES.names())
    assert mems["none"]["sites"] == []
    assert mems["memory_tokens"]["sites"] == ["embed"]
    assert mems["xl"]["sites"] == ["attn"]
    assert mems["kv_dense"]["sites"] == ["attn"]
    assert mems["none"]["state_size_at_1024"] == 0
    assert mems["xl"]["state_size_at_1024"] > 0 and mems["xl"]["max_tokens"] is not None
    assert mems["kv_dense"]["max_tokens"] is None            # document scope grows with the context
    for m in mems.values():
        assert m["summary"]
    tasks = {t["name"]: t for t in data["tasks"]}
    assert {"lm", "mqar", "passkey", "segment_ar"} <= set(tasks) == set(TASKS.names())
    assert tasks["lm"]["metric"] == "bpb" and tasks["lm"]["higher_is_better"] is False
    assert tasks["mqar"]["metric"] == "acc" and tasks["passkey"]["metric"] == "exact"
    assert tasks["segment_ar"]["higher_is_better"] is True


def test_list_text(capsys):
    rc, out, _ = run(["list"], capsys)
    assert rc == 0
    for name in list(MEMORIES.names()) + list(TASKS.names()):
        assert f"  {name} " in out
    assert "memories" in out and "tasks:" in out


def test_list_json_via_the_entry_point():
    exe = memstack_exe()
    assert exe, "the `memstack` console script is not installed"
    p = subprocess.run([exe, "list", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert {m["name"] for m in json.loads(p.stdout)["memories"]} == set(MEMORIES.names())


# ------------------------------------------------------------------------------------ help and parsing

@pytest.mark.parametrize("sub,options", [
    ("list", ["--json"]),
    ("data", ["fetch", "status", "--no-progress"]),
    ("train", ["--config", "--out", "--resume", "--device", "--no-progress", "overrides", "model.n_layers=4"]),
    ("eval", ["--checkpoint", "--task", "--device", "overrides"]),
    ("bench", ["--suite", "--memories", "--out", "--device", "--no-progress", "quick", "overrides"]),
    ("generate", ["--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                  "--no-stop", "--device"]),
])
def test_subcommand_help(sub, options, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: memstack {sub}")
    for o in options:
        assert o in out, o


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("list", "data", "train", "eval", "bench", "generate"):
        assert sub in out


def test_no_command_and_unknown_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["list", "-x"])
    assert e.value.code == 2
    assert "unrecognized arguments: -x" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["list", "--model.n_layers=3"])                   # list takes no overrides
    assert e.value.code == 2


def _status_rows(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        if line.strip():
            name, rest = line.split(None, 1)
            rows[name] = rest.rsplit(None, 1)[0]          # the state; the path is the last field
    return rows


def test_data_status_reports_every_asset(capsys):
    """Whatever this machine has cached: required assets are ok (the tests' corpora are there),
    an optional one is `ok` exactly when it is present and `optional, not fetched` otherwise."""
    from memstack.data.assets import ASSETS, raw_dir

    rc, out, _ = run(["data", "status"], capsys)
    assert rc == 0
    rows = _status_rows(out)
    assert set(rows) == set(ASSETS)
    for name, asset in ASSETS.items():
        if asset.optional:
            want = "ok" if (raw_dir() / asset.filename).exists() else "optional, not fetched"
        else:
            want = "ok"
        assert rows[name] == want, (name, out)


def test_data_status_on_a_machine_without_the_optional_assets(capsys, tmp_path, monkeypatch):
    from asset_views import optional_names, without_optional_assets
    from memstack.data.assets import ASSETS, data_dir

    view = without_optional_assets(data_dir(), tmp_path / "data")
    monkeypatch.setenv("MEMSTACK_DATA", str(view))
    rc, out, _ = run(["data", "status"], capsys)
    assert rc == 0
    rows = _status_rows(out)
    assert optional_names() == ["smollm2"]
    assert rows == {n: ("optional, not fetched" if a.optional else "ok") for n, a in ASSETS.items()}
    (view / "raw" / ASSETS["sotu"].filename).unlink()
    rc, out, _ = run(["data", "status"], capsys)
    assert _status_rows(out)["sotu"] == "MISSING"


def test_the_view_without_optional_assets_hides_them_and_what_is_derived_from_them(tmp_path):
    """What `MEMSTACK_HIDE_OPTIONAL_ASSETS=1` (.ci/run) gives the whole test session, on a machine
    that has SmolLM2 cached: the required files are there, SmolLM2's wheel and cache/smollm2 are not."""
    from asset_views import without_optional_assets
    from memstack.data.assets import ASSETS

    src = tmp_path / "cached"
    (src / "raw").mkdir(parents=True)
    for a in ASSETS.values():
        (src / "raw" / a.filename).write_bytes(a.name.encode())
    (src / "cache" / "smollm2").mkdir(parents=True)
    (src / "cache" / "gpt2").mkdir()
    (src / "cache" / "bpe512-abc.json").write_text("{}")
    view = without_optional_assets(src, tmp_path / "view")
    assert sorted(p.name for p in (view / "raw").iterdir()) == sorted(a.filename for a in ASSETS.values() if not a.optional)
    assert sorted(p.name for p in (view / "cache").iterdir()) == ["bpe512-abc.json", "gpt2"]
    assert (view / "raw" / ASSETS["sotu"].filename).read_bytes() == b"sotu"


# ------------------------------------------------------------------------------------ config errors

def test_bench_unknown_memory_lists_valid_names(capsys):
    rc, out, err = run(["bench", "--memories", "nosuch", "--no-progress"], capsys)
    assert rc != 0
    assert "nosuch" in err
    for name in MEMORIES.names():
        assert name in err
    assert out == ""                                           # nothing ran


def test_bench_unknown_memory_via_the_entry_point(tmp_path):
    p = subprocess.run([memstack_exe(), "bench", "--memories", "none,nosuch", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "nosuch" in p.stderr and "kv_dense" in p.stderr and "memory_tokens" in p.stderr
    assert not any(tmp_path.iterdir())


def test_bench_bad_overrides_list_every_reason(capsys):
    rc, _, err = run(["bench", "tokens_per_cell=0", "lrs=[-1]", "--no-progress"], capsys)
    assert rc == 2
    assert "tokens_per_cell must be >= 1" in err and "lrs must be" in err


def test_train_invalid_config_lists_both_reasons(capsys):
    rc, out, err = run(["train", "--config", "lm_tiny", "model.d_model=30", "train.lr=-1", "--no-progress"], capsys)
    assert rc != 0
    assert "d_model (30) must be divisible by n_heads (4)" in err
    assert "lr must be > 0" in err
    assert "2 problem(s)" in err
    # the --KEY=VALUE spelling gives the same
    rc2, _, err2 = run(["train", "--config", "lm_tiny", "--model.d_model=30", "--train.lr=-1"], capsys)
    assert rc2 == rc and err2 == err


def test_train_unknown_field_suggests_the_right_one(capsys):
    rc, _, err = run(["train", "--config", "lm_tiny", "model.d_modl=32"], capsys)
    assert rc == 2
    assert "d_modl" in err and "did you mean 'd_model'" in err


def test_train_override_of_a_missing_list_index(capsys):
    rc, _, err = run(["train", "--config", "xl_tiny", "memories.3.mem_len=8"], capsys)
    assert rc == 2 and "memories.3" in err


def test_unknown_preset_lists_valid_presets(capsys):
    rc, _, err = run(["train", "--config", "nosuch"], capsys)
    assert rc == 2
    assert "nosuch" in err
    for p in sorted(x.stem for x in (REPO / "configs" / "train").glob("*.yaml")):
        assert p in err
    rc, _, err = run(["bench", "--suite", "nosuch"], capsys)
    assert rc == 2 and "quick" in err and "full" in err


def test_missing_config_file(capsys, tmp_path):
    rc, _, err = run(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert rc == 2 and "not found" in err


def test_train_without_task_says_what_to_do(capsys, tmp_path):
    cfg = tmp_path / "notask.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"d_model": 32}}))
    rc, _, err = run(["train", "--config", str(cfg)], capsys)
    assert rc == 2 and "task is required" in err


# ------------------------------------------------------------------------------------ train -> eval -> generate

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_RUN))
    out_dir = root / "run"
    buf, err = io.StringIO(), io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = main(["train", "--config", str(cfg), "--out", str(out_dir), "--no-progress",
                   "--model.n_layers=3", "train.warmup_steps=2"])
    assert rc == 0, err.getvalue()
    return out_dir, buf.getvalue()


def latest(out_dir: Path) -> Path:
    from memstack.train.trainer import resolve_step_dir

    return resolve_step_dir(out_dir / "ckpt")


def test_train_prints_the_final_record(trained):
    out_dir, stdout = trained
    rec = json_head(stdout)
    assert rec["step"] == 3 and rec["tokens"] == 3 * 2 * 2 * 16
    assert rec["eval"]["eval_tokens"] == 1000 and 0 < rec["eval"]["bpb"] < 9
    assert f"checkpoint: {out_dir}/ckpt" in stdout
    log = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == 3 and "eval" in log[-1]


def test_train_overrides_are_applied(trained):
    out_dir, _ = trained
    ck = latest(out_dir)
    assert ck.name == "step-0000003"
    saved = json.loads((ck / "config.json").read_text())
    backbone = saved["model"]["backbone"]
    assert backbone["n_layers"] == 3                          # --model.n_layers=3
    assert backbone["d_model"] == 32 and backbone["vocab_size"] == 257   # vocabulary from the task
    assert [(m["kind"], m["mem_len"]) for m in saved["model"]["memories"]] == [("xl", 16)]
    assert saved["meta"]["task"]["tokenizer"] == "byte" and saved["meta"]["tokenizer"] == "byte"
    trainer = json.loads((ck / "trainer.json").read_text())
    assert trainer["train"]["warmup_steps"] == 2              # train.warmup_steps=2
    assert trainer["train"]["max_steps"] == 3                 # from the YAML


def test_train_resume_continues_from_the_checkpoint(trained, capsys, tmp_path):
    out_dir, _ = trained
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY_RUN))
    rc, out, err = run(["train", "--config", str(cfg), "--out", str(tmp_path / "more"), "--resume", str(out_dir / "ckpt"),
                        "--no-progress", "--model.n_layers=3", "train.warmup_steps=2", "train.max_steps=4"], capsys)
    assert rc == 0, err
    rec = json_head(out)
    assert rec["step"] == 4 and rec["tokens"] == 4 * 2 * 2 * 16
    assert latest(tmp_path / "more").name == "step-0000004"


def test_eval_checkpoint_prints_metrics(trained, capsys):
    out_dir, stdout = trained
    rc, out, err = run(["eval", "--checkpoint", str(out_dir), "--device", "cpu"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert set(m) >= {"bpb", "loss", "ppl", "eval_tokens", "eval_bytes"}
    assert m["eval_tokens"] == 1000
    # the checkpoint is the model that was evaluated at the end of training
    assert m["bpb"] == pytest.approx(json_head(stdout)["eval"]["bpb"], rel=1e-6)
    # a step directory and the ckpt folder work too
    rc, out2, _ = run(["eval", "--checkpoint", str(latest(out_dir))], capsys)
    assert rc == 0 and json.loads(out2) == m


def test_eval_task_overrides_apply_to_the_stored_task(trained, capsys):
    """`eval --checkpoint X task.eval_tokens=500` (the help's own example shape: task.eval_split=val)
    must evaluate the stored task with that field changed -- today it fails with "missing 'kind'",
    and `--task lm task.eval_tokens=500` builds a default lm task (bpe512) that does not fit the
    byte-level model."""
    out_dir, _ = trained
    rc, out, err = run(["eval", "--checkpoint", str(out_dir), "task.eval_tokens=500"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert m["eval_tokens"] == 500
    rc, out, err = run(["eval", "--checkpoint", str(out_dir), "--task", "lm", "task.eval_tokens=400"], capsys)
    assert rc == 0, err
    assert json.loads(out)["eval_tokens"] == 400


def test_eval_overrides_outside_task_are_refused(trained, capsys):
    """Overrides that are not task.* are silently dropped today (`eval_tokens=10` below would
    evaluate all 1000 tokens); an override that changes nothing must be an error."""
    out_dir, _ = trained
    rc, out, err = run(["eval", "--checkpoint", str(out_dir), "--task", "lm", "task.tokenizer=byte",
                        "task.eval_tokens=200", "eval_tokens=10"], capsys)
    assert rc == 2 and "eval_tokens" in err and out == ""


def test_eval_other_task_with_explicit_fields(trained, capsys):
    out_dir, _ = trained
    rc, out, err = run(["eval", "--checkpoint", str(out_dir), "--task", "lm", "task.tokenizer=byte",
                        "task.eval_tokens=300", "task.corpus=austen"], capsys)
    assert rc == 0, err
    assert json.loads(out)["eval_tokens"] == 300


def test_eval_task_with_another_vocabulary_is_refused(trained, capsys):
    out_dir, _ = trained
    rc, out, err = run(["eval", "--checkpoint", str(out_dir), "--task", "mqar"], capsys)
    assert rc == 2 and out == ""
    assert "512" in err and "257" in err


def test_generate_continues_the_prompt(trained, capsys):
    out_dir, _ = trained
    rc, out, err = run(["generate", "--checkpoint", str(out_dir), "--prompt", "The", "--max-new-tokens", "12"], capsys)
    assert rc == 0, err
    assert out.startswith("The") and out.endswith("\n")
    assert len(out.encode("utf-8")) <= len("The") + 12 + 1 + 12 * 2   # at most 12 bytes (+ replacement chars)


def test_generate_matches_the_library(trained, capsys):
    """The CLI prints exactly the decoded greedy continuation of `generate`."""
    from memstack.generate import SamplingConfig, generate
    from memstack.train.run import load_for_inference

    out_dir, _ = trained
    model, _, tok = load_for_inference(out_dir, "cpu")
    ids = [int(t) for t in generate(model, torch.tensor([tok.encode("We the")]),
                                    SamplingConfig(max_new_tokens=10, stop_ids=(tok.eot_id,)))]
    ids = ids[:ids.index(tok.eot_id)] if tok.eot_id in ids else ids
    want = tok.decode(ids)
    rc, out, _ = run(["generate", "--checkpoint", str(out_dir), "--prompt", "We the", "--max-new-tokens", "10"], capsys)
    assert rc == 0
    printed = out[len("We the"):-1]
    assert want.startswith(printed) and (printed == want or want[len(printed):].endswith("\ufffd"))


def test_generate_sampling_is_seeded(trained, capsys):
    out_dir, _ = trained
    args = ["generate", "--checkpoint", str(out_dir), "--prompt", "A", "--max-new-tokens", "16",
            "--temperature", "1.0", "--top-k", "40", "--top-p", "0.95"]
    outs = [run(args + ["--seed", s], capsys) for s in ("1", "1", "2")]
    assert all(rc == 0 for rc, _, _ in outs)
    assert outs[0][1] == outs[1][1]
    assert outs[0][1].startswith("A")


def test_generate_bad_sampling_options_list_every_reason(trained, capsys):
    out_dir, _ = trained
    rc, _, err = run(["generate", "--checkpoint", str(out_dir), "--top-p", "0", "--temperature", "-1"], capsys)
    assert rc == 2 and "top_p" in err and "temperature" in err


def test_corrupted_checkpoint_is_refused(trained, capsys, tmp_path):
    out_dir, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(latest(out_dir), bad)
    (weights,) = bad.glob("model-*.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF                               # inside the tensor data
    weights.write_bytes(bytes(data))
    rc, out, err = run(["eval", "--checkpoint", str(bad)], capsys)
    assert rc != 0 and out == ""
    assert "checksum" in err and weights.name in err
    rc, _, err = run(["generate", "--checkpoint", str(bad), "--prompt", "x"], capsys)
    assert rc != 0 and "checksum" in err


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = run(["eval", "--checkpoint", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "no checkpoint found" in err


def test_checkpoint_without_tokenizer_or_task(capsys, tmp_path):
    from memstack.backbone.model import build_model
    from memstack.checkpoint import save_checkpoint
    from memstack.config import BackboneConfig

    save_checkpoint(build_model(BackboneConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, seg_len=8)), tmp_path)
    rc, _, err = run(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"], capsys)
    assert rc == 2 and "no tokenizer" in err
    rc, _, err = run(["eval", "--checkpoint", str(tmp_path)], capsys)
    assert rc == 2 and "no task" in err
    rc, out, err = run(["eval", "--checkpoint", str(tmp_path), "--task", "segment_ar", "task.n_test=4"], capsys)
    assert rc == 0, err
    m = json.loads(out)
    assert set(m) == {"acc", "exact"} and 0 <= m["acc"] <= 1


# ------------------------------------------------------------------------------------ bench end to end

def test_bench_runs_a_tiny_suite(capsys, tmp_path, monkeypatch):
    suite = {"name": "tiny", "backbone": {"d_model": 32, "n_layers": 1, "n_heads": 2, "seg_len": 16},
             "memories": ["none", "xl"], "memory_configs": {"xl": {"mem_len": 16}},
             "tasks": [{"kind": "lm", "tokenizer": "byte", "eval_tokens": 300}],
             "train": {"batch_size": 2, "n_segments": 1}, "lrs": [0.003], "tokens_per_cell": 64,
             "time_budget_s": None, "device": "cpu"}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    reports = tmp_path / "reports"
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "unrelated"])   # main(argv) must not read sys.argv
    rc, out, err = run(["bench", "--suite", str(path), "--memories", "none", "--out", str(reports), "--no-progress",
                        "lrs=[0.003]"], capsys)
    assert rc == 0, err
    (run_dir,) = (reports / "tiny").iterdir()
    recs = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    assert [r["memory"] for r in recs] == ["none"]               # --memories replaces the suite's list
    assert recs[0]["steps"] == 2
    header = next(i for i, line in enumerate(out.splitlines()) if line.startswith("memory"))
    assert "lm bpb" in out.splitlines()[header]
    assert out.splitlines()[header + 2].startswith("none")
    assert str(run_dir) in out
    for f in ("leaderboard.md", "quality_vs_state_size.png", "bpb.png"):
        assert (run_dir / f).is_file(), f
    md = (run_dir / "leaderboard.md").read_text()
    assert f"--suite {path}" in md and "unrelated" not in md
