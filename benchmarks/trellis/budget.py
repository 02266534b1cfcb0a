"""Accuracy vs memory budget: Trellis against a sliding-window KV cache of the same bytes.

For each budget b (in "KV-token equivalents": the bytes a dense KV cache spends on b tokens) it
trains and evaluates, with the same backbone, token budget and learning rate:
  kv_dense   scope=document, window=b                 (exact, forgets everything older)
  trellis    slots=b, window=0                        (everything past the segment compressed)
  trellis    slots=b/2, window=b/2                    (half exact window, half slots)
plus two reference points: `none` (the segment alone) and `kv_dense` whose window spans a whole
training example (`--full-ref window`, the default: exact full context at bounded cost) or with no
window at all (`--full-ref unbounded`; slow in training: a document-scoped dense cache masks, but
does not drop, the keys of finished documents, so it grows over the whole run).
Each training step backpropagates through all the segments of an example (`n_segments`), so the
gradient reaches Trellis's writes (gates, step sizes, initial slots) from the reads that use them;
with one segment per step the writes would never be trained.
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
from memstack.memory.baseline import NoMemoryConfig
from memstack.memory.kv.config import DenseKVConfig, TrellisConfig
from memstack.train.config import TrainConfig
from memstack.train.distributed import resolve_device


def variants(budgets: list[int], full_ref: str, example_len: int, gate_init: float = 0.0) -> list[tuple[str, int | None, object]]:
    full = (("kv_dense (unbounded)", None, DenseKVConfig(scope="document")) if full_ref == "unbounded" else
            (f"kv_dense window={example_len} (reference)", None, DenseKVConfig(scope="document", window=example_len)))
    out: list[tuple[str, int | None, object]] = [("none", None, NoMemoryConfig()), full]
    for b in budgets:
        out.append((f"kv_dense window={b}", b, DenseKVConfig(scope="document", window=b)))
        g = f" gate_init={gate_init:g}" if gate_init else ""
        out.append((f"trellis slots={b}{g}", b, TrellisConfig(slots=b, window=0, gate_init=gate_init)))
        if b >= 2:
            out.append((f"trellis slots={b // 2} window={b // 2}{g}", b,
                        TrellisConfig(slots=b // 2, window=b // 2, gate_init=gate_init)))
    return out


TASKS = {  # task config, segment length, segments per training example (the BPTT window)
    # examples span several segments, so answers need memory
    "mqar": ({"kind": "mqar", "vocab": 128, "seq_len": 64, "num_kv_pairs": 4, "n_train": 20000, "n_test": 500}, 16, 4),
    "passkey": ({"kind": "passkey", "tokenizer": "bpe512", "train_len": 160, "lengths": [160, 320],
                 "depths": [0.0, 0.5, 1.0], "per_cell": 16, "n_train": 8000, "n_digits": 3}, 32, 5),
    # SOTU language modelling with 16-token segments: the context beyond the segment is what the memory adds
    "lm": ({"kind": "lm", "corpus": "sotu", "tokenizer": "bpe512", "eval_split": "test", "eval_tokens": 16384,
            "eval_rows": 8}, 16, 4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/trellis_budget")
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--tokens", type=int, default=400_000, help="training tokens per cell")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--full-ref", choices=["window", "unbounded"], default="window",
                    help="full-context reference: a window spanning the whole example, or no window")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    ap.add_argument("--gate-init", type=float, default=0.0,
                    help="Trellis output gate at initialisation (0: the memory starts switched off)")
    ap.add_argument("--only", nargs="*", default=None, help="run only the variants whose label contains one of these")
    args = ap.parse_args()
    device = resolve_device(args.device)
    env = environment(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    with open(out / "records.jsonl", "a") as f:
        for tname in args.tasks:
            task_fields, seg_len, n_seg = TASKS[tname]
            train = TrainConfig(batch_size=16, n_segments=n_seg, weight_decay=0.1, grad_clip=1.0, log_every=1000,
                                progress=False)
            tc = from_dict(TaskConfig, task_fields)
            backbone = BackboneConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seg_len=seg_len)
            suite = SuiteConfig(name="trellis-budget", backbone=backbone, memories=("none",), tasks=(tc,), train=train,
                                lrs=(args.lr,), tokens_per_cell=args.tokens, device=args.device, seeds=(args.seed,))
            task = build_task(tc, backbone.seg_len)
            for label, budget, mem in variants(args.budgets, args.full_ref, seg_len * n_seg, args.gate_init):
                if args.only is not None and not any(o in label for o in args.only):
                    continue
                t0 = time.perf_counter()
                rec = run_cell(suite, mem, tc, args.lr, args.tokens, device, env, task)
                rec.update(label=label if args.seed == 0 else f"{label} seed={args.seed}", budget_tokens=budget)
                recs.append(rec)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                m = rec["metrics"]
                print(f"{tname:8s} {label:32s} {rec['primary']}={m.get(rec['primary'], float('nan')):.3f} "
                      f"state={rec['state_bytes']:,}B  {time.perf_counter() - t0:.0f}s", flush=True)
    write_summary(recs, out)


def family(label: str) -> str:
    if label.startswith("kv_dense window=") and "(reference)" not in label:
        return "kv_dense (sliding window)"
    if label.startswith("trellis"):
        return "trellis (slots + window)" if "window" in label else "trellis (slots only)"
    return ""


def write_summary(recs: list[dict], out: Path) -> None:
    lines = ["| task | memory | budget (KV tokens) | state bytes / example | metric | train tok/s |", "|---|---|---|---|---|---|"]
    for r in recs:
        v = r["metrics"].get(r["primary"], float("nan"))
        lines.append(f"| {r['task']} | {r['label']} | {r['budget_tokens'] or '-'} | {r['state_bytes']:,} | "
                     f"{r['primary']} {v:.3f} | {r['tok_per_s']:,.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in recs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        rows = [r for r in recs if r["task"] == t]
        if len({r["budget_tokens"] for r in rows} - {None}) <= 1:  # one budget: bars read better than lines
            ax.barh([f"{r['label']}\n({r['state_bytes']:,} B)" for r in rows],
                    [r["metrics"][r["primary"]] for r in rows], color="tab:blue")
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xlabel(rows[0]["primary"])
            ax.set_title(f"{t} (state bytes per example in brackets)")
            continue
        for fam, style in [("kv_dense (sliding window)", "o-"), ("trellis (slots only)", "s-"), ("trellis (slots + window)", "^-")]:
            pts = sorted((r for r in rows if family(r["label"]) == fam), key=lambda r: r["state_bytes"])
            if pts:
                ax.plot([p["state_bytes"] for p in pts], [p["metrics"][p["primary"]] for p in pts], style, label=fam)
        for r, color in zip([r for r in rows if r["budget_tokens"] is None], ["gray", "black"]):
            ax.axhline(r["metrics"][r["primary"]], ls="--", lw=0.8, color=color, label=r["label"])
        ax.set_xscale("log")
        ax.set_xlabel("state bytes per example (MemorySpec)")
        ax.set_ylabel(rows[0]["primary"])
        ax.set_title(t)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_budget.png", dpi=120)


def summarize(path: str) -> None:
    recs = [json.loads(x) for x in open(path)]
    write_summary(recs, Path(path).parent)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        main()
