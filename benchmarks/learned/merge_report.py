"""One leaderboard (and its frontier and ablation plots) from bench records of several runs that
share every setting: e.g. `memstack bench --suite learned_lm --memories ...` for some memories and
`benchmarks/learned/compressive_vs_xl.py` for the others (its records carry a `label`; pick one
per memory with --pick). Refuses records whose backbone, training budget, learning rate, seed or
task config differ, so the plot only ever compares like with like.

    .venv/bin/python benchmarks/learned/merge_report.py --out reports/learned_b_600k \\
        reports/learned_lm600/learned_lm/*/records.jsonl reports/compressive_vs_xl/records.jsonl \\
        --pick "none,xl m=32,compressive conv m=16 c=16 r=4" --seed 0

Writes leaderboard.md, quality_vs_state_size.png (the Zoology frontier), memory_ablation.png and
bpb.png into --out (memstack/evals/report.py). Measures nothing itself.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memstack.evals.report import write_report

# settings that must agree across merged records (log_every, progress: bookkeeping only)
_SAME_TRAIN = ("lr", "max_steps", "warmup_steps", "batch_size", "n_segments", "weight_decay", "grad_clip", "bptt", "seed")


def _key(r: dict) -> tuple:
    c = r["config"]
    return (json.dumps(c["backbone"], sort_keys=True), json.dumps({k: c["train"][k] for k in _SAME_TRAIN}, sort_keys=True),
            json.dumps(c.get("task"), sort_keys=True), r["seed"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", help="records.jsonl files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pick", default="", help="comma-separated labels to keep from labelled records (others dropped)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    picks = [p.strip() for p in args.pick.split(",") if p.strip()]
    recs, seen = [], {}
    for path in args.records:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if r["seed"] != args.seed or ("label" in r and r["label"] not in picks):
                continue
            if r["memory"] in seen:       # a memory twice (e.g. a rerun): keep the one with the ablation
                if "metrics_ablated" in r and "metrics_ablated" not in seen[r["memory"]]:
                    recs.remove(seen[r["memory"]])
                else:
                    continue
            r.setdefault("budget_scale", 1.0)
            r.setdefault("tokens_per_cell", r["train_tokens"])
            seen[r["memory"]] = r
            recs.append(r)
    if not recs:
        sys.exit("no records left after --seed/--pick")
    keys = {_key(r) for r in recs}
    if len(keys) > 1:
        sys.exit("records differ in backbone / training / task / seed settings; not merging:\n" +
                 "\n".join(f"  {r['memory']}: {_key(r)}" for r in recs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "merged: " + ", ".join(dict.fromkeys(r["suite"] for r in recs))
    for r in recs:
        r["suite"] = name
    text = write_report(recs, out, command=" ".join(["benchmarks/learned/merge_report.py", *(argv or sys.argv[1:])]))
    lb = out / "leaderboard.md"
    lb.write_text(lb.read_text().replace("\n\n| memory |", "\n- merged runs: the tok/s column compares separate runs "
                                         "made under different machine load -- not a throughput measurement\n\n| memory |", 1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
