"""Shared by the runtime benchmarks: timing, the record every run writes, the table it prints.

Benchmarks measure, they never assert. Each writes one JSON record (config, git SHA, device,
versions, figures) under reports/benchmarks/runtime/ and prints a short table.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device="cpu", warmup: int = 2, reps: int = 7) -> float:
    """Median seconds of `reps` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def device_info(device: torch.device | str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()} (machine shared)"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_record(name: str, config: dict, results: list[dict], device) -> Path:
    out = Path(os.environ.get("MEMSTACK_BENCH_OUT", "reports/benchmarks/runtime"))
    out.mkdir(parents=True, exist_ok=True)
    rec = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_sha(), "device": device_info(device),
           "torch": torch.__version__, "config": config, "results": results}
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(rec, indent=1))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    lines = [" | ".join(c.ljust(w[c]) for c in cols), "-|-".join("-" * w[c] for c in cols)]
    lines += [" | ".join(_fmt(r.get(c)).ljust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
