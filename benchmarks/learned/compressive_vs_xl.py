"""Claim check: the Compressive Transformer beats Transformer-XL on language modelling at equal
attention span (Rae et al., arXiv 1911.05507: PG-19 33.6 vs 36.3 ppl; our corpus: SOTU).

Equal attention span: XL keeps m + c states per layer; Compressive keeps m states plus c
compressed slots at rate r (reach m + r*c). Every variant trains on the same backbone, the same
data order, the same token budget and learning rate (the harness's `run_cell`), then reports
bits per byte on the SOTU test split (and, unless --no-ablate, again with the memory switched
off: evals/ablation.py). Also run: the plain backbone, XL with m states only (what
the compressed memory adds to), and other compression functions.

    .venv/bin/python benchmarks/learned/compressive_vs_xl.py --out reports/compressive_vs_xl

Writes records.jsonl, summary.md and bpb.png into --out. Measures, never asserts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from memstack.config import BackboneConfig, from_dict
from memstack.evals.bench import SuiteConfig, environment, run_cell
from memstack.evals.lm import LMTaskConfig
from memstack.evals.task import build_task
from memstack.registry import MEMORIES
from memstack.train.config import TrainConfig
from memstack.train.distributed import resolve_device


def variants(m: int, c: int, r: int) -> list[tuple[str, str, dict]]:
    return [("none", "none", {}),
            (f"xl m={m}", "xl", {"mem_len": m}),
            (f"xl m={m + c}", "xl", {"mem_len": m + c}),
            (f"compressive conv m={m} c={c} r={r}", "compressive", {"mem_len": m, "cmem_len": c, "rate": r, "compression": "conv"}),
            (f"compressive mean m={m} c={c} r={r}", "compressive", {"mem_len": m, "cmem_len": c, "rate": r, "compression": "mean"}),
            (f"compressive max m={m} c={c} r={r}", "compressive", {"mem_len": m, "cmem_len": c, "rate": r, "compression": "max"}),
            (f"compressive most_used m={m} c={c} r={r}", "compressive",
             {"mem_len": m, "cmem_len": c, "rate": r, "compression": "most_used"}),
            (f"compressive dilated_conv m={m} c={c} r={r}", "compressive",
             {"mem_len": m, "cmem_len": c, "rate": r, "compression": "dilated_conv"})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, default=32, help="recent states per layer (both)")
    ap.add_argument("--c", type=int, default=32, help="compressed slots (Compressive) = extra states (XL)")
    ap.add_argument("--rate", type=int, default=4)
    ap.add_argument("--seg-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", default="0,1", help="seeds for the XL(m+c) vs Compressive-conv pair")
    ap.add_argument("--only", help="comma-separated indices of variants to run (default: all)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="0: the whole test split")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-ablate", action="store_true",
                    help="skip evaluating each model with its memory switched off (evals/ablation.py)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    env = environment(device)
    task_cfg = LMTaskConfig(corpus="sotu", tokenizer="bpe512", eval_split="test",
                            eval_tokens=args.eval_tokens or None)
    suite = SuiteConfig(name="compressive_vs_xl", backbone=BackboneConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                                          seg_len=args.seg_len),
                        memories=("none",), tasks=(task_cfg,),
                        train=TrainConfig(batch_size=16, n_segments=4, weight_decay=0.1, grad_clip=1.0), lrs=(args.lr,),
                        tokens_per_cell=args.tokens, time_budget_s=None, device=args.device,
                        ablate=not args.no_ablate)
    task = build_task(task_cfg, args.seg_len)
    vs = variants(args.m, args.c, args.rate)
    pick = [int(i) for i in args.only.split(",")] if args.only else range(len(vs))
    seeds = [int(s) for s in args.seeds.split(",")]
    path = out / "records.jsonl"
    for i in pick:
        label, kind, fields = vs[i]
        for seed in (seeds if i in (2, 3) else seeds[:1]):
            mem = from_dict(MEMORIES.config_class(kind), fields, what=label)
            t0 = time.time()
            rec = run_cell(suite, mem, task_cfg, args.lr, args.tokens, device, env, task, seed=seed)
            rec.update(label=label, command=" ".join(["benchmarks/learned/compressive_vs_xl.py", *(argv or sys.argv[1:])]))
            print(f"{label:<40} seed {seed}: bpb {rec['metrics']['bpb']:.4f}  ({time.time() - t0:.0f} s, "
                  f"{rec['tok_per_s']:,.0f} tok/s)", flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
    summarize(out)
    return 0


def summarize(out: Path) -> None:
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    by: dict[str, list[dict]] = {}
    for r in recs:
        by.setdefault(r["label"], []).append(r)
    lines = ["| variant | keys per query beyond the segment | reach (tokens) | state size | bpb (per seed) | mean bpb "
             "| bpb, memory off (per seed) |",
             "|---|---|---|---|---|---|---|"]
    for label, rs in by.items():
        mc = rs[0]["config"]["memory"]
        span = mc.get("mem_len", 0) + mc.get("cmem_len", 0)
        reach = mc.get("mem_len", 0) + mc.get("rate", 0) * mc.get("cmem_len", 0)
        vals = [r["metrics"]["bpb"] for r in rs]
        per_seed = ", ".join("%.4f (s%d)" % (v, r["seed"]) for v, r in zip(vals, rs))
        off = ", ".join("%.4f" % r["metrics_ablated"]["bpb"] if "metrics_ablated" in r else "-" for r in rs)
        lines.append(f"| {label} | {span} | {reach} | {rs[0]['state_size']} | "
                     f"{per_seed} | {statistics.mean(vals):.4f} | {off} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, (label, rs) in enumerate(by.items()):
        vals = [r["metrics"]["bpb"] for r in rs]
        color = "tab:red" if label.startswith("compressive") else ("tab:blue" if label.startswith("xl") else "tab:gray")
        ax.barh(i, statistics.mean(vals), color=color, alpha=0.7)
        ax.scatter(vals, [i] * len(vals), color="black", s=12, zorder=3)
        ax.text(statistics.mean(vals), i, f" {statistics.mean(vals):.4f}", va="center", fontsize=8)
    ax.set_yticks(range(len(by)), list(by), fontsize=8)
    lo = min(r["metrics"]["bpb"] for r in recs)
    hi = max(r["metrics"]["bpb"] for r in recs)
    ax.set_xlim(lo - 0.25 * (hi - lo) - 1e-3, hi + 0.35 * (hi - lo) + 1e-3)
    ax.invert_yaxis()
    ax.set_xlabel("SOTU test bits per byte (lower is better); dots: seeds")
    ax.set_title("Compressive vs Transformer-XL at equal attention span", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "bpb.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
