"""`memstack datastore build | info`: the build step of the retrieval memories.

    memstack datastore build --kind knn_lm --checkpoint runs/lm --out stores/sotu-knn   (hidden states of a trained model)
    memstack datastore build --kind retro --tokenizer bpe512 --chunk 64 --out stores/sotu-retro
    memstack datastore build --kind rag --out stores/wiki-minilm                         (MiniLM over the Wikipedia extracts)
    memstack datastore info stores/sotu-knn

A memory then points at the store through its config, e.g. `memories: [{kind: knn_lm, store: stores/sotu-knn}]`.
"""
from __future__ import annotations

import argparse
import json

from memstack.memory.retrieval.config import BACKENDS, RetroConfig, StoreConfig


def add_parser(sub) -> None:
    s = sub.add_parser("datastore", help="build / inspect retrieval datastores (kNN-LM, RETRO, RAG)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("action", choices=["build", "info"])
    s.add_argument("path", nargs="?", help="info: the store directory")
    s.add_argument("--kind", choices=["knn_lm", "retro", "rag"], help="build: what the store is for")
    s.add_argument("--out", help="build: output directory")
    s.add_argument("--checkpoint", help="knn_lm: the trained model whose hidden states become keys")
    s.add_argument("--corpus", default="sotu", choices=["sotu", "austen", "moby_dick"], help="knn_lm / retro corpus")
    s.add_argument("--split", default="train", choices=["train", "val", "test"])
    s.add_argument("--tokenizer", default="bpe512", help="retro: tokenizer (its vocabulary sizes the key table)")
    s.add_argument("--chunk", type=int, default=64, help="retro: chunk length")
    s.add_argument("--key", default="bag", choices=["bag", "minilm"],
                   help="retro: chunk keys from the frozen MiniLM over the chunk's text (the paper's frozen embedder) "
                        "or a bag of frozen random token vectors")
    s.add_argument("--key-dim", type=int, default=64, help="retro: chunk key dimension (bag keys)")
    s.add_argument("--key-seed", type=int, default=1234, help="retro: seed of the frozen key table")
    s.add_argument("--backend", default="exact", choices=list(BACKENDS))
    s.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored key precision")
    s.add_argument("--max-tokens", type=int, help="knn_lm: stop after this many entries")
    s.add_argument("--limit", type=int, help="rag: only the first N passages")
    s.add_argument("--rows", type=int, default=8, help="knn_lm: documents read in parallel")
    s.add_argument("--device")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_datastore)


def cmd_datastore(args: argparse.Namespace) -> int:
    from memstack.errors import MemstackError
    from memstack.memory.retrieval.store import Datastore

    if args.action == "info":
        if not args.path:
            raise MemstackError("datastore info needs a store directory")
        s = Datastore.open(args.path)
        print(json.dumps({"entries": len(s), "rows": s.n_rows, "tombstones": s.n_tombstones, "fingerprint": s.fingerprint,
                          "backend": s.cfg.backend, "dim": s.cfg.dim, "metric": s.cfg.metric, "dtype": s.cfg.dtype,
                          "namespaces": {n: s.count(n) for n in s.namespaces if not n.startswith("\x00")}, "payload": {k: [d, list(v)] for k, (d, v) in s.schema.items()},
                          "text": s.has_text}, indent=1))
        return 0
    missing = [f"--{n}" for n in ("kind", "out") if not getattr(args, n)]
    if args.kind == "knn_lm" and not args.checkpoint:
        missing.append("--checkpoint")
    if missing:
        raise MemstackError(f"datastore build needs {', '.join(missing)}")
    progress = not args.no_progress
    if args.kind == "knn_lm":
        from memstack.evals.lm import corpus_split
        from memstack.memory.retrieval.knn_lm import build_knnlm_store
        from memstack.train.run import load_for_inference

        model, meta, tok = load_for_inference(args.checkpoint, args.device or "auto")
        if tok is None:
            raise MemstackError(f"{args.checkpoint} records no tokenizer; cannot tokenize the corpus")
        docs = [tok.encode(t) for t in corpus_split(args.corpus, args.split)]
        cfg = StoreConfig(dim=model.cfg.backbone.d_model, backend=args.backend, dtype=args.dtype)
        store = build_knnlm_store(model, docs, args.out, cfg, rows=args.rows, eot_id=tok.eot_id, progress=progress,
                                  max_tokens=args.max_tokens)
    elif args.kind == "retro":
        from memstack.data.tokenizers import get_tokenizer
        from memstack.evals.lm import corpus_split
        from memstack.memory.retrieval.retro import build_retro_store

        tok = get_tokenizer(args.tokenizer)
        docs = [tok.encode(t) for t in corpus_split(args.corpus, args.split)]
        cfg = RetroConfig(chunk=args.chunk, key_dim=args.key_dim, key_seed=args.key_seed, key=args.key,
                          tokenizer=args.tokenizer)
        store = build_retro_store(docs, len(tok.token_bytes()), cfg, tok.eot_id, args.out, backend=args.backend,
                                  progress=progress)
    else:
        from memstack.data.wiki import retrieval_eval_set
        from memstack.memory.retrieval.embedder import Embedder
        from memstack.memory.retrieval.rag import build_passage_store

        passages, _, _ = retrieval_eval_set()
        if args.limit:
            passages = passages[: args.limit]
        store = build_passage_store(passages, Embedder(device=args.device or "cpu"), args.out, backend=args.backend,
                                    progress=progress)
    print(f"datastore: {len(store):,} entries -> {args.out} (fingerprint {store.fingerprint})")
    return 0
