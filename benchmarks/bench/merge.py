"""Merge the records of one suite run as several invocations (e.g. `--memories` subsets run in
parallel) into one leaderboard. Cells are deterministic and warm starts are shared through the
cache, so the merged records equal one invocation's; this refuses records whose suite settings
differ (other than the memory list and the task list), and orders them as one run would.

    python benchmarks/bench/merge.py --out reports/quick-merged DIR/records.jsonl ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memstack.evals.report import write_report

_FREE = ("memories", "tasks", "warm_start", "seeds", "save_models")   # a cell depends on its own seed only


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--order", help="comma-separated memory order (default: the first suite config's list)")
    args = ap.parse_args(argv)
    recs = [json.loads(x) for p in args.records for x in Path(p).read_text().splitlines() if x.strip()]
    if not recs:
        sys.exit("no records")
    same = lambda r: json.dumps({k: v for k, v in r["config"]["suite"].items() if k not in _FREE}, sort_keys=True)  # noqa: E731
    if len({same(r) for r in recs}) > 1:
        sys.exit("records come from suites with different settings; not merging")
    uniq: dict = {}
    for r in recs:            # a cell run by two invocations: deterministic, keep one (say if they differ)
        key = (r["memory"], r["task"], r["lr"], r["seed"])
        if key in uniq and uniq[key]["metrics"] != r["metrics"]:
            print(f"warning: {key} differs between invocations: {uniq[key]['metrics']} vs {r['metrics']}", file=sys.stderr)
        uniq.setdefault(key, r)
    recs = list(uniq.values())
    seeds = sorted({r["seed"] for r in recs})
    for r in recs:            # invocations run with a subset of the seeds: the merged run has them all
        r["seeds"] = seeds
    order = args.order.split(",") if args.order else None
    tasks = list(dict.fromkeys(r["task"] for r in recs))
    mems = order or list(dict.fromkeys(m for r in recs for m in [r["memory"]]))
    recs.sort(key=lambda r: (tasks.index(r["task"]), mems.index(r["memory"]) if r["memory"] in mems else 99,
                             r["lr"], r["seed"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "records.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    print(write_report(recs, out, command=" ".join(["python benchmarks/bench/merge.py", *(argv or sys.argv[1:])])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
