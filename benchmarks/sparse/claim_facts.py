"""Claim check (Engram §6.3): with the tables switched off at evaluation, factual recall (facts
seen in training) collapses while an in-context task holds.

Trains a plain backbone and an Engram model (same backbone, same steps) on the `facts` task
(closed-book statements of 200 synthetic facts mixed with in-context examples), then evaluates
the Engram model with its tables and with Engram removed (the same backbone weights, no memory).

    .venv/bin/python benchmarks/sparse/claim_facts.py [--steps 400]

Writes docs/benchmarks/sparse/claim_facts.json. Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import backbone, train_cell, write_json

from memstack.backbone.model import build_model
from memstack.config import ModelConfig
from memstack.evals.facts import FactsTaskConfig
from memstack.evals.task import build_task
from memstack.memory.sparse.config import EngramConfig
from memstack.train.config import TrainConfig


def without_memories(model: torch.nn.Module) -> torch.nn.Module:
    """The same backbone weights with no memory attached (the tables switched off)."""
    plain = build_model(ModelConfig(model.cfg.backbone, ()))
    missing, _ = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    return plain.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--facts", type=int, default=200, help="closed-book facts to memorise")
    ap.add_argument("--rows", type=int, default=4093, help="Engram rows per head")
    ap.add_argument("--icl-pairs", type=int, default=2, help="fresh pairs stated before an in-context query")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain backbone reference")
    ap.add_argument("--tag", default="", help="suffix of the result file and run directories")
    ap.add_argument("--icl-frac", type=float, default=0.5, help="share of in-context training examples")
    args = ap.parse_args()
    task = FactsTaskConfig(n_facts=args.facts, seq_len=128, icl_frac=args.icl_frac, icl_pairs=args.icl_pairs,
                           n_train=20000, n_icl_test=200)
    train = TrainConfig(lr=args.lr, warmup_steps=20, max_steps=args.steps, batch_size=args.batch, log_every=100, progress=False)
    bb = backbone(seg_len=128)
    eng = EngramConfig(layers=(0,), orders=(2, 3), heads=4, head_dim=8, rows_per_head=args.rows, tokenizer="bpe512")
    res = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "task": task.__dict__, "rows_per_head": args.rows,
           "d_model": bb.d_model, "n_layers": bb.n_layers, "runs": {}}
    if not args.no_plain:
        plain_model, rec, secs = train_cell(ModelConfig(bb, ()), task, train, out_dir=Path(f"runs/claims/facts{args.tag}_plain"))
        res["runs"]["plain"] = {**rec["eval"], "seconds": secs, "params": plain_model.num_params()}
        print("plain", res["runs"]["plain"], flush=True)
        write_json("claim_facts" + args.tag, res)
    model, rec, secs = train_cell(ModelConfig(bb, (eng,)), task, train, out_dir=Path(f"runs/claims/facts{args.tag}_engram"))
    table = sum(p.numel() for n, p in model.named_parameters() if n.endswith("table.weight"))
    res["runs"]["engram"] = {**rec["eval"], "seconds": secs, "params": model.num_params(), "table_params": table}
    t = build_task(task, bb.seg_len)
    res["runs"]["engram_tables_off"] = {**t.evaluate(without_memories(model)), "params": model.num_params() - table}
    for k in ("fact_acc", "icl_acc"):
        on, off = res["runs"]["engram"][k], res["runs"]["engram_tables_off"][k]
        res[f"{k}_retained"] = off / on if on > 0 else None
    print(res, flush=True)
    write_json("claim_facts" + args.tag, res)


if __name__ == "__main__":
    main()
