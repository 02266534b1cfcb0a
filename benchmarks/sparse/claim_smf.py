"""Claim check (sparse memory finetuning, arXiv 2510.15103): learning new facts by updating only
the top-t table rows (TF-IDF against background access counts, frozen backbone) forgets far less
held-out text than full finetuning, at equal new-fact accuracy (paper: -11% vs -89% on NQ F1).

Starts from an Engram model pretrained on SOTU (claim_scaling.py's engram_r4096 checkpoint),
teaches it `--facts` new synthetic facts (evals/facts.py statements) two ways, evaluating every
`--every` steps: new-fact accuracy (closed-book) and SOTU validation bits per byte (forgetting):
  smf:  OnlineUpdater (memory/sparse/online.py): table rows only, top_t rows per batch, Adam
  full: every parameter, Adam (dense AdamW without decay for the backbone, lazy Adam for rows)
Then compares the bpb increase at the highest accuracy both reach.

    .venv/bin/python benchmarks/sparse/claim_smf.py [--ckpt runs/claims/engram_r4096] [--steps 150]

Writes docs/benchmarks/sparse/claim_smf<tag>.json and docs/benchmarks/img/sparse_claim_smf<tag>.png. Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from common import write_json

from memstack.backbone.model import cross_entropy
from memstack.evals.facts import FactsTask, FactsTaskConfig
from memstack.evals.lm import LMTask, LMTaskConfig
from memstack.memory.sparse.online import OnlineUpdater, UpdatePolicy, background_frequencies
from memstack.train.config import TrainConfig
from memstack.train.optim import build_optimizer
from memstack.train.run import load_for_inference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/claims/engram_r4096")
    ap.add_argument("--facts", type=int, default=20)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--top-t", type=int, default=500, help="rows updated per batch (0: every touched row, no SMF selection)")
    ap.add_argument("--tag", default="", help="suffix of the result file (variants)")
    ap.add_argument("--lr-smf", type=float, default=3e-2)
    ap.add_argument("--lr-full", type=float, default=1e-3)
    args = ap.parse_args()
    base, _, _ = load_for_inference(args.ckpt, "cpu")
    seg = base.cfg.backbone.seg_len
    lm = LMTask(LMTaskConfig(corpus="sotu", tokenizer="bpe512", eval_split="val", eval_tokens=10000), seg)
    facts = FactsTask(FactsTaskConfig(n_facts=args.facts, seq_len=seg, seed=123), seg)
    x, y = facts.fact_test                       # statements; train on the whole statement
    rows = [facts._row([(f"the code of {k} is {v}.", True)]) for k, v in facts.facts]
    tx = torch.as_tensor(np.stack([r[0] for r in rows]))
    ty = torch.as_tensor(np.stack([r[1] for r in rows]))
    bpb0 = lm.evaluate(base.eval())["bpb"]
    out = {"ckpt": args.ckpt, "facts": args.facts, "steps": args.steps, "every": args.every, "top_t": args.top_t,
           "lr_smf": args.lr_smf, "lr_full": args.lr_full, "base_bpb": bpb0, "curves": {}}

    def curve(name, model, step_fn):
        pts = []
        for s in range(args.steps + 1):
            if s % args.every == 0:
                model.eval()
                with torch.no_grad():
                    acc = facts.evaluate(model)["fact_acc"]
                    bpb = lm.evaluate(model)["bpb"]
                pts.append({"step": s, "fact_acc": acc, "bpb": bpb, "forgetting": (bpb - bpb0) / bpb0})
                print(name, pts[-1], flush=True)
                if acc >= 1.0:
                    break
            if s < args.steps:
                idx = torch.randint(0, tx.shape[0], (8,))
                step_fn(tx[idx], ty[idx])
        out["curves"][name] = pts
        write_json("claim_smf" + args.tag, out)

    # SMF: table rows only, TF-IDF top-t against background (SOTU train) document frequencies
    smf = copy.deepcopy(base)
    table = smf.memory.memories[0].table
    bg_src = lm.train_source(8, 0)
    df = background_frequencies(smf, table, [bg_src.next(1).tokens[:, 0] for _ in range(8)])
    up = OnlineUpdater(smf, table, lr=args.lr_smf, top_t=args.top_t or None, background=df,
                       policy=UpdatePolicy(max_row_update_norm=None))
    curve("smf", smf, lambda a, b: up.step(a, b))

    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)
    opt = build_optimizer(full, TrainConfig(lr=args.lr_full, weight_decay=0.0))

    def full_step(a, b):
        full.train()
        opt.zero_grad()
        out_, _ = full(a)
        cross_entropy(out_.logits, b).backward()
        opt.step()

    curve("full", full, full_step)
    best = {k: max(p["fact_acc"] for p in v) for k, v in out["curves"].items()}
    target = min(best.values())
    out["equal_accuracy"] = target
    out["at_equal_accuracy"] = {k: at_accuracy(v, target) for k, v in out["curves"].items()}
    print(out["at_equal_accuracy"], flush=True)
    write_json("claim_smf" + args.tag, out)
    plot(out, args.tag)


def at_accuracy(pts: list[dict], target: float) -> dict:
    """Forgetting where a curve first reaches `target` new-fact accuracy, linearly interpolated
    between the evaluation before and the one at/after (the curves are measured every --every steps)."""
    i = next(i for i, p in enumerate(pts) if p["fact_acc"] >= target)
    p = pts[i]
    if i == 0 or p["fact_acc"] == target:
        return {**p, "interpolated": False}
    q = pts[i - 1]
    w = (target - q["fact_acc"]) / (p["fact_acc"] - q["fact_acc"])
    return {"step": q["step"] + w * (p["step"] - q["step"]), "fact_acc": target,
            "bpb": q["bpb"] + w * (p["bpb"] - q["bpb"]), "forgetting": q["forgetting"] + w * (p["forgetting"] - q["forgetting"]),
            "interpolated": True}


def plot(out: dict, tag: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import IMG

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sel = f"top-{out['top_t']}" if out["top_t"] else "every touched row"
    labels = {"smf": f"sparse memory finetuning (rows only, {sel})", "full": "full finetuning"}
    for k, pts in out["curves"].items():
        ax.plot([p["fact_acc"] for p in pts], [100 * p["forgetting"] for p in pts], "o-", label=labels.get(k, k))
    ax.set_xlabel("new-fact accuracy (closed book)")
    ax.set_ylabel("forgetting: SOTU val bpb increase (%)")
    ax.set_title(f"Learning {out['facts']} new facts: forgetting vs accuracy (CPU)")
    ax.legend()
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / f"sparse_claim_smf{tag}.png", dpi=110)


if __name__ == "__main__":
    main()
