"""Accuracy vs memory budget: Trellis against a sliding-window KV cache of the same bytes.

For each budget b (in "KV-token equivalents": the bytes a dense KV cache spends on b tokens) it
trains and evaluates, with the same backbone, token budget and learning rate:
  kv_dense   scope=document, window=b                 (exact, forgets everything older)
  trellis    slots=b, window=0                        (everything past the segment compressed)
  trellis    slots=b/2, window=b/2                    (half exact window, half slots)
plus two reference points: `none` (the segment alone) and `kv_dense` with no window (unbounded).
State bytes are taken from each memory's MemorySpec at the task's context length and reported,
so "same budget" is checked, not assumed. Measures, never asserts.

    .venv/bin/python benchmarks/trellis/budget.py --out reports/trellis_budget
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from memstack.config import BackboneConfig, from_dict
from memstack.evals.bench import SuiteConfig, environment, run_cell
from memstack.evals.task import TaskConfig, build_task
from memstack.memory.kv.config import DenseKVConfig, TrellisConfig
from memstack.memory.baseline import NoMemoryConfig
from memstack.train.config import TrainConfig
from memstack.train.distributed import resolve_device


def variants(budgets: list[int]) -> list[tuple[str, int | None, object]]:
    out: list[tuple[str, int | None, object]] = [("none", None, NoMemoryConfig()),
                                                 ("kv_dense (unbounded)", None, DenseKVConfig(scope="document"))]
    for b in budgets:
        out.append((f"kv_dense window={b}", b, DenseKVConfig(scope="document", window=b)))
        out.append((f"trellis slots={b}", b, TrellisConfig(slots=b, window=0)))
        if b >= 2:
            out.append((f"trellis slots={b // 2} window={b // 2}", b, TrellisConfig(slots=b // 2, window=b // 2)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/trellis_budget")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--tasks", nargs="+", default=["mqar", "passkey"])
    ap.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per cell")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seg-len", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    tasks = {
        "mqar": {"kind": "mqar", "vocab": 256, "seq_len": 128, "num_kv_pairs": 8, "n_train": 20000, "n_test": 500},
        "passkey": {"kind": "passkey", "tokenizer": "bpe512", "train_len": 128, "lengths": [128, 256],
                    "depths": [0.0, 0.5, 1.0], "per_cell": 16, "n_train": 8000, "n_digits": 3},
    }
    backbone = BackboneConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=args.seg_len)
    train = TrainConfig(batch_size=16, n_segments=1, weight_decay=0.1, grad_clip=1.0, log_every=1000, progress=False)
    device = resolve_device(args.device)
    env = environment(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    with open(out / "records.jsonl", "w") as f:
        for tname in args.tasks:
            tc = from_dict(TaskConfig, tasks[tname])
            suite = SuiteConfig(name="trellis-budget", backbone=backbone, memories=("none",), tasks=(tc,), train=train,
                                lrs=(args.lr,), tokens_per_cell=args.tokens, device=args.device)
            task = build_task(tc, backbone.seg_len)
            for label, budget, mem in variants(args.budgets):
                t0 = time.perf_counter()
                rec = run_cell(suite, mem, tc, args.lr, args.tokens, device, env, task)
                rec.update(label=label, budget_tokens=budget)
                recs.append(rec)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                m = rec["metrics"]
                print(f"{tname:8s} {label:32s} {rec['primary']}={m.get(rec['primary'], float('nan')):.3f} "
                      f"state={rec['state_bytes']:,}B  {time.perf_counter() - t0:.0f}s", flush=True)
    write_summary(recs, out)


def write_summary(recs: list[dict], out: Path) -> None:
    lines = ["| task | memory | budget (KV tokens) | state bytes / example | metric | tok/s (train) |", "|---|---|---|---|---|---|"]
    for r in recs:
        v = r["metrics"].get(r["primary"], float("nan"))
        lines.append(f"| {r['task']} | {r['label']} | {r['budget_tokens'] or '-'} | {r['state_bytes']:,} | "
                     f"{r['primary']} {v:.3f} | {r['tok_per_s']:,.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = list(dict.fromkeys(r["task"] for r in recs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        rows = [r for r in recs if r["task"] == t]
        fams = {"kv_dense window": "o-", "trellis slots=": "s-", "window=": "^-"}
        for fam, style in [("kv_dense window=", "o-"), ("trellis slots={} window", "^-"), ("trellis slots={}", "s-")]:
            pts = []
            for r in rows:
                lab = r["label"]
                if fam == "kv_dense window=" and lab.startswith("kv_dense window="):
                    pts.append(r)
                elif fam == "trellis slots={} window" and lab.startswith("trellis") and "window" in lab:
                    pts.append(r)
                elif fam == "trellis slots={}" and lab.startswith("trellis") and "window" not in lab:
                    pts.append(r)
            if pts:
                name = {"kv_dense window=": "kv_dense (sliding window)", "trellis slots={} window": "trellis (slots + window)",
                        "trellis slots={}": "trellis (slots only)"}[fam]
                ax.plot([p["state_bytes"] for p in pts], [p["metrics"][p["primary"]] for p in pts], style, label=name)
        for r in rows:
            if r["budget_tokens"] is None:
                ax.axhline(r["metrics"][r["primary"]], ls="--", lw=0.8, color="gray")
                ax.text(ax.get_xlim()[0], r["metrics"][r["primary"]], " " + r["label"], fontsize=7, va="bottom")
        del fams
        ax.set_xscale("log")
        ax.set_xlabel("state bytes per example")
        ax.set_ylabel(rows[0]["primary"])
        ax.set_title(t)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_budget.png", dpi=120)


if __name__ == "__main__":
    main()
