"""Slow: 64 concurrent streaming clients for 60 s against `memstack serve` on loopback
(benchmarks/server/serve_bench.py soak): no request fails; TTFT / latency percentiles and the
server's RSS before and after are printed (figures, not assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_64_streaming_clients_for_60_seconds(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/server/serve_bench.py"), "soak", "--clients", "64",
                        "--duration", "60", "--d-model", "64", "--layers", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env={**__import__("os").environ, "MEMSTACK_BENCH_OUT": str(tmp_path)})
    print(r.stdout)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    row = rec["results"][0]
    assert row["errors"] == 0, row["error_examples"]
    assert row["requests"] >= 64 and row["tokens"] == 64 * row["requests"]        # every stream ran to the end
    assert rec["rss_mb_after"] < rec["rss_mb_before"] + 512                        # no runaway growth
