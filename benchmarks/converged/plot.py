"""Plot the converged suite's results: what each approach recalls, what it costs the base model,
and what it stores per user (docs/converged.md).

    python benchmarks/converged/plot.py docs/benchmarks/converged/converged_cpu_8x3-20261204.json \
        docs/benchmarks/converged/converged_cpu_8x3_ft-20261204.json --out docs/benchmarks/converged/converged_cpu_8x3.png

Records are merged in order: an approach in a later record replaces the same approach of an earlier
one (the separate full fine-tuning pass replaces the first run's coarser-grid row). Two panels:
recall after 3 mentions (95 % Wilson interval) against the held-out bits-per-byte change, and
against the bytes stored per user (log scale). Reads records; measures nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LABELS = {"base": "plain backbone", "in_context": "facts in context", "rag": "RAG", "tables": "sparse user tables",
          "tables_rag": "tables + RAG", "lora": "LoRA per user", "full_ft": "full fine-tuning per user"}


def merged(paths: list[Path]) -> tuple[dict, list[str]]:
    results, sources = {}, []
    for p in paths:
        rec = json.loads(p.read_text())
        results.update(rec["results"])
        sources.append(f"{p.name} ({rec.get('date', '?')})")
    return results, sources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, sources = merged(args.records)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, r) in enumerate(res.items()):
        y = r["recall@3"]
        lo, hi = r["recall@3_stats"]["ci95"]
        err = [[y - lo], [hi - y]]
        style = {"color": f"C{i}", "marker": "o", "capsize": 3, "label": LABELS.get(name, name)}
        a.errorbar(100 * r["bpb_change"], y, yerr=err, **style)
        b.errorbar(max(r["bytes_per_user"], 1), y, yerr=err, **style)
    a.axvline(1.0, color="grey", ls=":", lw=1)
    a.text(1.02, 0.5, "1 % budget", color="grey", fontsize=8, rotation=90)
    for ax in (a, b):
        ax.axhline(0.9, color="grey", ls="--", lw=1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("recall after 3 mentions (95 % CI)")
    a.set_xlabel("held-out bits per byte, change vs the plain backbone (%)")
    b.set_xscale("log")
    b.set_xlabel("bytes stored per user (log; plain backbone drawn at 1)")
    a.legend(fontsize=8, loc="lower right")
    n = next(iter(res.values()))
    fig.suptitle(f"Converged suite, SmolLM2-135M-Instruct frozen: {n['users']} test users x "
                 f"{n['recall@3_stats']['n'] // max(n['users'], 1)} facts", fontsize=10)
    fig.text(0.01, 0.01, "records: " + "; ".join(sources), fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
