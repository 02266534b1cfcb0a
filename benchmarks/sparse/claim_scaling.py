"""Claim check (Engram §3.2, §4): at equal activated parameters, Engram lowers SOTU bits per
byte vs the plain backbone; more table slots lower it further (log-linear); a one-row table
does not help (gains come from capacity, cf. Engram issue #24).

    .venv/bin/python benchmarks/sparse/claim_scaling.py [--steps 200] [--rows 1,64,512,4096,32768]

Writes docs/benchmarks/sparse/claim_scaling.json and docs/benchmarks/img/sparse_claim_scaling.png. Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import math

from common import IMG, OUT, backbone, matched_plain, train_cell, write_json
from memstack.config import ModelConfig
from memstack.evals.lm import LMTaskConfig
from memstack.memory.sparse.config import EngramConfig
from memstack.train.config import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rows", default="1,64,512,4096,32768", help="rows_per_head values")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--save", default="runs/claims", help="checkpoints go here (the SMF claim reuses one)")
    ap.add_argument("--tag", default="", help="suffix of the result file (parallel partial runs)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain backbone cell")
    ap.add_argument("--merge", action="store_true", help="merge claim_scaling*.json into claim_scaling.json and plot")
    args = ap.parse_args()
    if args.merge:
        return merge()
    task = LMTaskConfig(corpus="sotu", tokenizer="bpe512", eval_split="val", eval_tokens=20000)
    train = TrainConfig(lr=args.lr, warmup_steps=20, max_steps=args.steps, batch_size=args.batch, n_segments=2, log_every=50,
                        progress=False)
    bb = backbone()
    eng = lambda r: EngramConfig(layers=(0,), orders=(2, 3), heads=4, head_dim=8, rows_per_head=r, tokenizer="bpe512")  # noqa: E731
    wide, plain_extra, dense = matched_plain(eng(1), bb)
    results = {"steps": args.steps, "lr": args.lr, "tokens": args.steps * args.batch * 2 * 64, "batch": args.batch, "engram_dense_params": dense,
               "plain_extra_params": plain_extra, "plain_d_ff": wide.ff_dim, "runs": []}
    print(f"plain backbone widened to d_ff {wide.ff_dim} (+{plain_extra} params) vs Engram's {dense} dense params")
    cells = ([] if args.no_plain else [("plain", ModelConfig(wide, ()), 0)]) + [(f"engram_r{r}", ModelConfig(bb, (eng(r),)), r)
                                                      for r in map(int, args.rows.split(","))]
    from pathlib import Path

    for name, mc, r in cells:
        model, rec, secs = train_cell(mc, task, train, out_dir=Path(args.save) / name)
        table = sum(p.numel() for n, p in model.named_parameters() if n.endswith("table.weight"))  # slots: rows over all heads (head_dim 8)
        row = {"name": name, "rows_per_head": r, "slots": table // 8 if r else 0, "table_params": table,
               "params": model.num_params(), "active_params": model.num_params() - table, "bpb": rec["eval"]["bpb"],
               "train_loss": rec["loss"], "seconds": secs}
        results["runs"].append(row)
        print(row, flush=True)
        write_json("claim_scaling" + args.tag, results)
    if not args.tag:
        plot(results)


def merge() -> None:
    import json

    parts = [json.loads(p.read_text()) for p in sorted(OUT.glob("claim_scaling*.json")) if p.name != "claim_scaling.json"]
    base = json.loads((OUT / "claim_scaling.json").read_text()) if (OUT / "claim_scaling.json").exists() else parts[0]
    runs = {r["name"]: r for r in base["runs"]}
    for p in parts:
        if p["steps"] != base["steps"] or p.get("batch") != base.get("batch"):
            continue                     # a different training length is a different experiment
        runs.update({r["name"]: r for r in p["runs"]})
    base["runs"] = sorted(runs.values(), key=lambda r: (r["name"] != "plain", r["rows_per_head"]))
    write_json("claim_scaling", base)
    plot(base)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = [r for r in results["runs"] if r["name"] != "plain"]
    plain = next(r for r in results["runs"] if r["name"] == "plain")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [r["slots"] for r in eng]
    ax.plot(xs, [r["bpb"] for r in eng], "o-", label="Engram (2+3-grams, 8 heads)")
    ax.axhline(plain["bpb"], color="gray", ls="--", label="plain backbone, equal active params")
    ax.set_xscale("log")
    ax.set_xlabel("table slots (rows, all heads)")
    ax.set_ylabel("SOTU val bits per byte")
    ax.set_title(f"Engram slots vs loss ({results['tokens'] / 1e6:.2f}M train tokens, CPU)")
    ax.legend()
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "sparse_claim_scaling.png", dpi=120)
    # log-linear fit over the multi-row tables
    pts = [(math.log(r["slots"]), r["bpb"]) for r in eng if r["rows_per_head"] > 1]
    if len(pts) >= 2:
        n = len(pts)
        mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / max(sum((x - mx) ** 2 for x, _ in pts), 1e-12)
        results["loglinear_slope_bpb_per_e"] = slope
        from common import write_json as wj

        wj("claim_scaling", results)


if __name__ == "__main__":
    main()
