"""Evaluate trained long-context cells (a `longctx` suite run with `save_models: true`) at more
lengths, streamed segment by segment -- e.g. the 64k ... 1M points for the memories that are
above chance at 16k, without training them again. Appends the metrics to each record.

    python benchmarks/longctx/sweep.py RUN_DIR --lengths 65536,262144,1048576 --examples 8,4,4 [--memories rmt,armt]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from memstack.config import from_dict
from memstack.evals.bench import git_sha
from memstack.evals.longctx import LongContextTaskConfig
from memstack.evals.task import build_task
from memstack.train.run import load_for_inference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--memories", help="only these memories (default: every record with a checkpoint)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    lengths = [int(x) for x in args.lengths.split(",")]
    examples = [int(x) for x in args.examples.split(",")]
    path = Path(args.run_dir) / "records.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for r in recs:
        if not r.get("checkpoint") or (args.memories and r["memory"] not in args.memories.split(",")):
            continue
        model, _, _ = load_for_inference(r["checkpoint"], "cpu")
        cfg = from_dict(LongContextTaskConfig, {k: v for k, v in r["config"]["task"].items() if k != "kind"})
        cfg = dataclasses.replace(cfg, progress=not args.no_progress)
        task = build_task(cfg, model.cfg.backbone.seg_len)
        model.eval()
        for L, n in zip(lengths, examples):
            m = task.evaluate_length(model, L, n)
            r["metrics"].update(m)
            # the record says what was evaluated, and by which code, when
            tc = r["config"]["task"]
            pairs = dict(zip(tc["lengths"], tc["examples"]))
            pairs[L] = n
            tc["lengths"], tc["examples"] = sorted(pairs), [pairs[k] for k in sorted(pairs)]
            r.setdefault("sweeps", []).append({"length": L, "examples": n, "git_sha": git_sha(),
                                               "date": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(r["memory"], L, {k: round(v, 4) for k, v in m.items()}, flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(x) + "\n" for x in recs))
            tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
