"""`memstack bench --suite converged` (and `converged_cpu`): the converged system's evaluation
(memstack/evals/converged.py), dispatched by `memstack bench` for presets of `kind: converged`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_converged(args: argparse.Namespace, data: dict) -> int:
    from memstack.config import from_dict
    from memstack.evals.converged import ConvergedConfig, run_converged, table

    data = {k: v for k, v in data.items() if k != "kind"}
    if args.device not in (None, "cpu"):
        print(f"memstack bench: the converged suite runs on the CPU (got --device {args.device}); measuring on cpu")
    cfg = from_dict(ConvergedConfig, data, what="converged suite")
    out = Path(args.out) / cfg.name / time.strftime("%Y%m%d-%H%M%S")
    rec = run_converged(cfg, out, progress=not args.no_progress)
    command = " ".join(["memstack", *args.argv])
    md = f"command: `{command}`, date {rec['date']}, device cpu ({rec['threads']} threads), {rec['wall_s']:.0f} s\n\n"
    (out / "results.md").write_text(md + table(rec))
    print()
    print(md + table(rec))
    print(f"record and table: {out}")
    return 0
