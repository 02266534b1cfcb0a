"""Open-domain QA claims on our harness (issue 15): RAG-Sequence / RAG-Token vs closed-book and the
oracle passage in context (arXiv 2005.11401), and ATLAS few-shot with and without joint
retriever training (arXiv 2208.03299), all with the pinned SmolLM2-135M as reader/generator,
the shipped MiniLM retriever over the full 10,033-passage store, WikiQA-templates questions.

Every system starts from the same pretrained weights, trains on the same first `--train`
training questions for the same steps, and is scored with EM / F1 on the same questions.
Measures, never asserts; one JSON record per system in --out (written as each finishes).

    nice -n 10 .venv/bin/python benchmarks/retrieval/open_qa.py --store ~/.cache/memstack/retrieval/wiki-minilm \\
        --systems closed_book,oracle,rag_sequence,rag_token --train 64 --eval 100 --out reports/retrieval/open_qa.json \\
        steps=32 batch=2 k=4
Named runs: `--runs NAME:system=...,key=value;NAME2:...` overrides per run (e.g. frozen vs trained retriever).
With `--lrs A,B,...` each run trains once per learning rate (reader and retriever alike), is scored on
the first `--val` validation questions, and the learning rate with the best validation EM (then F1) is
trained again from the same weights and seed and scored on `--eval` questions of `--split`.
`--device cuda` runs the reader, the retriever and the passage index on the GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from memstack.config import apply_overrides, from_dict
from memstack.evals.bench import environment
from memstack.evals.open_qa import OpenQAConfig, run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--systems", default="", help="comma-separated systems, each a run named after it")
    p.add_argument("--runs", default="", help="NAME:key=value,key=value;NAME2:... (named runs with their own overrides)")
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--split", default="test")
    p.add_argument("--eval", type=int, default=100)
    p.add_argument("--out", default="reports/retrieval/open_qa.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lrs", default="", help="learning rates to choose from on validation (empty: the config's)")
    p.add_argument("--val", type=int, default=48, help="validation questions that choose the learning rate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="OpenQAConfig fields shared by every run, KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = [(s, [f"system={s}"] + (["retriever=frozen"] if s in ("closed_book", "oracle") else []))
            for s in args.systems.split(",") if s]
    for spec in [r for r in args.runs.split(";") if r.strip()]:
        name, _, kv = spec.partition(":")
        runs.append((name.strip(), [x for x in kv.split(",") if x]))
    from memstack.data.tokenizers import get_tokenizer
    from memstack.hf.pretrained import load_pretrained
    from memstack.memory.retrieval.embedder import Embedder
    from memstack.memory.retrieval.store import Datastore

    dev = torch.device(args.device)
    model = load_pretrained("smollm2").to(dev).eval()
    pristine = copy.deepcopy(model.state_dict())
    tok = get_tokenizer("smollm2")
    emb = Embedder(device=args.device)
    store = Datastore.open(args.store, expect_fingerprint=emb.fingerprint)
    store.to(dev)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    rec.update({"env": environment(dev), "store": args.store, "passages": len(store)})
    lrs = [float(x) for x in args.lrs.split(",") if x]

    def one(ov, split, n):
        cfg = from_dict(OpenQAConfig, apply_overrides({}, list(args.overrides) + ov), what=f"run {name}")
        model.load_state_dict(pristine)
        return run(cfg, pretrained="smollm2", train_questions=args.train, eval_split=split, eval_questions=n,
                   eval_batch=args.eval_batch, progress=not args.no_progress, model=model, tok=tok, embedder=emb,
                   datastore=store, store=args.store)

    for name, ov in runs:
        t0 = time.perf_counter()
        selection = []
        for lr in lrs if len(lrs) > 1 else []:
            v = one(ov + [f"lr_reader={lr}", f"lr_retriever={lr}"], "validation", args.val)
            selection.append({"lr": lr, "val_em": v["em"], "val_f1": v["f1"], "val_questions": v["questions"]})
            print(f"{name:<24} lr {lr:g}: validation EM {v['em']:5.1f}  F1 {v['f1']:5.1f}", flush=True)
        best = max(selection, key=lambda x: (x["val_em"], x["val_f1"]))["lr"] if selection else (lrs[0] if lrs else None)
        r = one(ov + ([f"lr_reader={best}", f"lr_retriever={best}"] if best is not None else []), args.split, args.eval)
        r["lr_selection"] = selection
        r.update({"seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "command": "benchmarks/retrieval/open_qa.py " + " ".join(f"--{k}={v}" for k, v in vars(args).items()
                                                                          if k not in ("overrides", "runs", "systems"))
                  + f" {' '.join(args.overrides + ov)}"})
        rec["runs"][name] = r
        out.write_text(json.dumps(rec, indent=1))
        print(f"{name:<24} EM {r['em']:5.1f}  F1 {r['f1']:5.1f}  recall@k {r.get('recall_at_k', float('nan')):5.1f}  "
              f"train {r['timing']['train_s']:.0f}s eval {r['timing']['eval_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
