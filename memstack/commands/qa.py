"""`memstack qa build | run`: the offline open-domain QA set and the QA systems (evals/open_qa.py).

    memstack qa build --out wikiqa.jsonl                       (the pinned WikiQA-templates set, one JSON line per question)
    memstack qa run system=closed_book --out rec.json          (few-shot train, then EM / F1)
    memstack qa run system=rag_token k=4 --store ~/.cache/memstack/retrieval/wiki-minilm --train 64 --eval 100
    memstack qa run system=atlas retriever=rerank objective=pdist --store DIR

Systems: closed_book, oracle, rag_sequence, rag_token, atlas. Overrides are OpenQAConfig fields
(KEY=VALUE): k, passage_tokens, retriever (frozen|query|rerank), candidates, temperature,
objective (pdist|emdr2), theta, steps, batch, lr_reader, lr_retriever, train_layers,
max_answer_tokens, seed. The generator is the pinned SmolLM2-135M (`memstack data fetch smollm2`).
"""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    s = sub.add_parser("qa", help="open-domain QA on the shipped Wikipedia extracts (RAG, ATLAS, baselines)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=["build", "run"])
    s.add_argument("--out", help="build: the JSONL file to write; run: the JSON record to write")
    s.add_argument("--store", help="run: the passage store of retrieving systems (memstack datastore build --kind rag)")
    s.add_argument("--pretrained", default="smollm2", help="run: the reader/generator backbone (default smollm2)")
    s.add_argument("--train", type=int, default=64, help="run: training questions (the first N of the train split)")
    s.add_argument("--split", default="test", choices=["train", "validation", "test"], help="run: evaluation split")
    s.add_argument("--eval", type=int, default=None, help="run: evaluate the first N questions of the split (default all)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("overrides", nargs="*", help="OpenQAConfig fields as KEY=VALUE, e.g. system=rag_token k=4 steps=32")
    s.set_defaults(fn=cmd_qa)


def cmd_qa(args: argparse.Namespace) -> int:
    from memstack.errors import MemstackError

    if args.action == "build":
        from dataclasses import asdict

        from memstack.data.wiki_qa import WIKI_QA_SHA256, wiki_qa

        items = wiki_qa()
        counts: dict[str, dict[str, int]] = {}
        for it in items:
            counts.setdefault(it.template, {}).setdefault(it.split, 0)
            counts[it.template][it.split] += 1
        if args.out:
            from pathlib import Path

            from memstack.data.assets import atomic_write_bytes

            atomic_write_bytes(Path(args.out), "".join(json.dumps(asdict(it), ensure_ascii=False) + "\n" for it in items).encode())
        print(json.dumps({"questions": len(items), "sha256": WIKI_QA_SHA256, "by_template": counts, "out": args.out}, indent=1))
        return 0
    from memstack.config import apply_overrides, from_dict
    from memstack.evals.open_qa import OpenQAConfig, run

    data = apply_overrides({}, [o.lstrip("-") for o in args.overrides])
    cfg = from_dict(OpenQAConfig, data, what="qa config")
    if args.train < 0 or (args.eval is not None and args.eval < 1):
        raise MemstackError("--train must be >= 0 and --eval >= 1")
    rec = run(cfg, store=args.store, pretrained=args.pretrained, train_questions=args.train, eval_split=args.split,
              eval_questions=args.eval, progress=not args.no_progress)
    if args.out:
        from pathlib import Path

        from memstack.atomic import write_json_atomic

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), rec)
    print(json.dumps({k: rec[k] for k in ("questions", "em", "f1", "recall_at_k", "em_by_template", "timing") if k in rec}, indent=1))
    return 0
