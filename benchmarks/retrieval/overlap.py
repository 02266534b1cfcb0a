"""How much of an evaluation split a datastore could supply verbatim (RETRO's leakage analysis,
arXiv 2112.04426 section 4.4): the share of the split's n-token windows that occur anywhere in
the store's split, and the share of its `chunk`-token chunks with at least a given fraction of
such windows. Tokens of the named tokenizer; the first `--tokens` tokens of the evaluated split.

    nice -n 10 .venv/bin/python benchmarks/retrieval/overlap.py --out docs/benchmarks/retrieval/overlap.json

Measures, never asserts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--tokenizer", default="smollm2")
    ap.add_argument("--store-split", default="train")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from memstack.data.tokenizers import encode_many, get_tokenizer
    from memstack.evals.lm import corpus_split

    tok, n, m = get_tokenizer(args.tokenizer), args.n, args.chunk
    grams = set()
    for d in encode_many(tok, corpus_split(args.corpus, args.store_split)):
        d = list(d)
        grams.update(tuple(d[i:i + n]) for i in range(len(d) - n + 1))
    fracs, hit, tot, used = [], 0, 0, 0
    for d in encode_many(tok, corpus_split(args.corpus, args.split)):
        d = list(d)[: args.tokens - used]
        used += len(d)
        for c in range(0, len(d) - m + 1, m):
            h = [tuple(d[c + i:c + i + n]) in grams for i in range(m - n + 1)]
            fracs.append(sum(h) / len(h))
            hit, tot = hit + sum(h), tot + len(h)
        if used >= args.tokens:
            break
    rec = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "eval_tokens": used,
           "chunks": len(fracs), "window_share": hit / max(tot, 1),
           "chunks_at_least": {str(t): sum(f >= t for f in fracs) / max(len(fracs), 1) for t in (0.1, 0.2, 0.5, 0.8)},
           "command": " ".join(["python", *sys.argv])}
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
