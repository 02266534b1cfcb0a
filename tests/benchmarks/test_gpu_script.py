"""benchmarks/gpu/run_all.sh, the one script for every GPU measurement, run in its CPU smoke mode
(tiny sizes, Triton under its interpreter): it must run each component and write one valid record.
The default suite runs the paged attention component (~10 s of CPU); the slow suite runs all four
through the shell wrapper."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check(rec: dict, names: list[str]) -> None:
    assert rec["benchmark"] == "gpu_run_all" and rec["smoke"] is True
    for n in names:
        part = rec["components"][n]
        assert part["status"] == "ok", (n, part.get("output_tail"))
        assert part["wall_s"] < part["limit_s"]
    s = rec["summary"]
    if "paged_attention" in names:
        assert _finite_positive(s["hbm_ceiling_GBps"]["read"]) and _finite_positive(s["hbm_ceiling_GBps"]["copy"])
        rows = s["paged_decode"]
        assert {(r["B"], r["L"]) for r in rows} == {(1, 40), (3, 40)}
        assert all(r["impl"] == "triton" and _finite_positive(r["GBps"]) and _finite_positive(r["speed_vs_contiguous_sdpa"])
                   for r in rows)
        dec = rec["components"]["paged_attention"]["record"]["decode"]
        assert all(_finite_positive(r["cpu_speed"]) and r["default"] == "cpu" for r in dec)
    if "linear_memory" in names:
        assert all(_finite_positive(r["speedup"]) and _finite_positive(r["triton_vs_chunked"]) for r in s["linear_memory"])
    if "engine_vs_hf" in names:
        assert {(r["case"], r["batch"]) for r in s["engine_vs_hf"]} == {(c, b) for c in ("equal", "mixed") for b in (1, 3)}
        assert all(r["token_agree"] == 1.0 and _finite_positive(r["engine/hf"]) for r in s["engine_vs_hf"])
    if "table_gather" in names:
        assert all(r["impl"] == "triton" and _finite_positive(r["GBps"]) for r in s["table_gather"])


def test_run_all_smoke_writes_one_record(tmp_path):
    out = tmp_path / "rec.json"
    names = ["paged_attention"]
    subprocess.run([sys.executable, "benchmarks/gpu/run_all.py", "--smoke", "--only", ",".join(names), "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    rec = json.loads(out.read_text())
    assert set(rec["components"]) == set(names)
    _check(rec, names)


@pytest.mark.slow
def test_run_all_sh_smoke_runs_every_component(tmp_path):
    out = tmp_path / "rec.json"
    subprocess.run(["bash", "benchmarks/gpu/run_all.sh", "--smoke", "--out", str(out)], cwd=REPO, check=True,
                   capture_output=True, timeout=900, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    rec = json.loads(out.read_text())
    names = ["paged_attention", "engine_vs_hf", "table_gather", "linear_memory"]
    assert list(rec["components"]) == names
    _check(rec, names)
