"""RAG (Lewis et al., arXiv 2005.11401) with an ATLAS-style retrieval pipeline (Izacard et al.,
arXiv 2208.03299): dense retrieval, lexical BM25, hybrid fusion, re-ranking, and the retrieved
passages put into the context for generation. Written from the papers; no ATLAS code is used
(its code is CC-BY-NC).

- dense: passages embedded once with the real embedder (all-MiniLM-L6-v2, embedder.py) into a
  `Datastore` (inner product on unit vectors = cosine; exact torch search or FAISS), with the
  passage index as payload and the passage text stored alongside; queries are embedded at
  search time. The store records the embedder's fingerprint and refuses another's queries.
- BM25: `bm25s` (Lucene variant, k1 1.5, b 0.75, English stopwords, no stemming).
- hybrid: reciprocal-rank fusion (Cormack et al. 2009), score = sum over lists of 1 / (60 + rank).
- re-ranking (over-retrieve, then re-score, as ATLAS's `--retrieve_with_rerank`): the union of
  both retrievers' top-`pool` candidates is re-scored by a convex combination of the
  per-query z-normalised dense and BM25 scores, alpha tuned on held-out queries. There is no
  cross-encoder among the offline packages; this is a score-level re-ranker, said as such.
- generation: the top passages, then the question, as the prompt of any memstack model
  (`RAGPipeline.prompt` / `generate`). RAG-Sequence / RAG-Token marginalisation over passages and
  the jointly trained retriever are not implemented (the retriever is frozen, as in RAG's
  document encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from memstack.memory.retrieval.config import StoreConfig
from memstack.memory.retrieval.store import Datastore, DatastoreError

RRF_K = 60


@dataclass
class Ranked:
    scores: np.ndarray   # (Q, k) higher = better; -inf where empty
    idx: np.ndarray      # (Q, k) passage indices; -1 where empty


def build_passage_store(passages: Sequence[str], embedder, out: str | Path | None = None, backend: str = "exact",
                        batch: int = 256, progress: bool = True, namespace: str = "default") -> Datastore:
    """Embed every passage and store (vector, passage index, text). Saved to `out` if given."""
    cfg = StoreConfig(dim=embedder.dim, metric="ip", backend=backend, nlist=64, nprobe=16)
    store = Datastore(cfg, embedder.fingerprint, payload={"passage": ("int64", ())}, text=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(passages), desc="embed passages", unit="psg", dynamic_ncols=True)
    for a in range(0, len(passages), batch):
        chunk = list(passages[a:a + batch])
        store.add(embedder.encode(chunk), {"passage": torch.arange(a, a + len(chunk))}, namespace=namespace, texts=chunk)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    if out is not None:
        store.save(out)
    return store


class DenseRetriever:
    def __init__(self, store: Datastore, embedder, namespace: str = "default"):
        if store.fingerprint != embedder.fingerprint:
            raise DatastoreError(f"the passage store was embedded by {store.fingerprint!r}, the query embedder is "
                                 f"{embedder.fingerprint!r}: their vectors are not comparable", "dense retriever")
        self.store, self.embedder, self.namespace = store, embedder, namespace

    def search_vectors(self, qv: Tensor, k: int) -> Ranked:
        ns = self.namespace if isinstance(self.namespace, str) else [tuple(self.namespace)] * len(qv)   # a union
        res = self.store.search(qv, k, ns)
        idx = torch.where(res.rows >= 0, self.store.payload("passage")[res.rows.clamp(min=0)], -1)
        return Ranked(res.scores.cpu().numpy(), idx.cpu().numpy())

    def search(self, queries: Sequence[str], k: int) -> Ranked:
        return self.search_vectors(self.embedder.encode(list(queries)), k)


class BM25Retriever:
    """BM25 over `passages`; results are their positions, or `ids[position]` when `ids` is given
    (the passage ids of a subset of a store, e.g. one namespace's live passages)."""

    def __init__(self, passages: Sequence[str], ids: Sequence[int] | None = None):
        import bm25s  # noqa: PLC0415 -- optional dependency

        self._bm25s = bm25s
        self.n = len(passages)
        self.ids = None if ids is None else np.asarray(ids, dtype=np.int64)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(list(passages), stopwords="en", show_progress=False), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> Ranked:
        k = min(k, self.n)
        toks = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        idx, scores = self.index.retrieve(toks, k=k, show_progress=False, n_threads=1)
        idx, scores = np.asarray(idx, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        if self.ids is not None:
            idx = self.ids[idx]
        # a query with no indexed term scores 0 everywhere: that is no match, not a ranking
        return Ranked(np.where(scores > 0, scores, -np.inf), np.where(scores > 0, idx, -1))

    def scores_of(self, query_tokens, passages: np.ndarray) -> np.ndarray:
        """BM25 scores of one tokenized query for the given result ids (-inf for ids not indexed)."""
        full = self.index.get_scores(query_tokens) if query_tokens else np.zeros(self.n, np.float32)
        if self.ids is None:
            return full[passages]
        where = {int(p): i for i, p in enumerate(self.ids)}
        return np.array([full[where[int(p)]] if int(p) in where else -np.inf for p in passages], np.float32)


def rrf(lists: Sequence[Ranked], k: int, c: int = RRF_K) -> Ranked:
    """Reciprocal-rank fusion of ranked lists (per query), top-k of the fused score."""
    Q = lists[0].idx.shape[0]
    out_s = np.full((Q, k), -np.inf, np.float32)
    out_i = np.full((Q, k), -1, np.int64)
    for q in range(Q):
        acc: dict[int, float] = {}
        for lst in lists:
            for rank, p in enumerate(lst.idx[q]):
                if p >= 0:
                    acc[int(p)] = acc.get(int(p), 0.0) + 1.0 / (c + rank + 1)
        top = sorted(acc.items(), key=lambda x: (-x[1], x[0]))[:k]
        for j, (p, s) in enumerate(top):
            out_s[q, j], out_i[q, j] = s, p
    return Ranked(out_s, out_i)


def _z(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    if not ok.any():
        return np.zeros_like(x)
    m, s = x[ok].mean(), x[ok].std()
    return np.where(ok, (x - m) / (s if s > 0 else 1.0), -1e9)


def rerank(dense_s: np.ndarray, bm25_s: np.ndarray, pool: np.ndarray, alpha: float, k: int) -> Ranked:
    """Re-score a candidate pool (Q, P) by alpha * z(dense) + (1 - alpha) * z(bm25); the
    per-candidate scores (Q, P) are exact (dense: cosine of the stored vectors; bm25: BM25)."""
    Q = pool.shape[0]
    out_s = np.full((Q, k), -np.inf, np.float32)
    out_i = np.full((Q, k), -1, np.int64)
    for q in range(Q):
        ok = pool[q] >= 0
        if not ok.any():
            continue
        d, b = dense_s[q][ok], bm25_s[q][ok]
        b = np.where(np.isfinite(b), b, 0.0)               # not matched lexically = BM25 score 0
        s = alpha * _z(d) + (1 - alpha) * _z(b)
        order = np.argsort(-s, kind="stable")[:k]
        out_s[q, :len(order)], out_i[q, :len(order)] = s[order], pool[q][ok][order]
    return Ranked(out_s, out_i)


class RAGPipeline:
    """Dense + BM25 -> hybrid (RRF) or re-ranked candidates -> passages in the prompt."""

    def __init__(self, dense: DenseRetriever, bm25: BM25Retriever, pool: int = 100, alpha: float = 0.5):
        self.dense, self.bm25, self.pool, self.alpha = dense, bm25, pool, alpha

    def candidates(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, Ranked, Ranked]:
        """(pool (Q, P) passage ids, dense scores (Q, P), bm25 scores (Q, P), dense list, bm25 list)."""
        qv = self.dense.embedder.encode(list(queries))
        return self.candidates_from(qv, queries)

    def candidates_from(self, qv: Tensor, queries: Sequence[str]):
        d = self.dense.search_vectors(qv, self.pool)
        b = self.bm25.search(queries, self.pool)
        Q = len(queries)
        pool = np.full((Q, 2 * self.pool), -1, np.int64)
        for q in range(Q):
            u = list(dict.fromkeys([int(x) for x in d.idx[q] if x >= 0] + [int(x) for x in b.idx[q] if x >= 0]))
            pool[q, :len(u)] = u
        # exact scores of every pooled candidate under both scorers
        store = self.dense.store
        by_passage = torch.full((int(store.payload("passage").max()) + 1 if store.n_rows else 1,), -1, dtype=torch.long)
        live = store.alive.cpu()                                 # (a forgotten namespace's rows are zeroed)
        by_passage[store.payload("passage").cpu()[live]] = torch.arange(store.n_rows)[live]
        rows = by_passage[torch.from_numpy(pool).clamp(min=0)]
        ds = (store.keys.float().cpu()[rows] * qv.float()[:, None, :]).sum(-1).numpy()
        ds = np.where(pool >= 0, ds, -np.inf)
        toks = self.bm25._bm25s.tokenize(list(queries), stopwords="en", show_progress=False, return_ids=False)
        bs = np.full(pool.shape, -np.inf, np.float32)
        for q in range(Q):
            ok = pool[q] >= 0
            bs[q, ok] = self.bm25.scores_of(toks[q], pool[q][ok])
        return pool, ds, bs, d, b

    def retrieve(self, queries: Sequence[str], k: int, method: str = "rerank") -> Ranked:
        if method == "dense":
            return self.dense.search(queries, k)
        if method == "bm25":
            return self.bm25.search(queries, k)
        pool, ds, bs, d, b = self.candidates(queries)
        if method == "hybrid":
            return rrf([d, b], k)
        if method == "rerank":
            return rerank(ds, bs, pool, self.alpha, k)
        raise ValueError(f"method must be dense, bm25, hybrid or rerank, got {method!r}")

    def prompt(self, question: str, k: int = 3, method: str = "rerank", max_chars: int = 1500) -> str:
        """The retrieved passages, best first, then the question: the generator's context."""
        top = self.retrieve([question], k, method).idx[0]
        store = self.dense.store
        row_of = {int(p): r for r, (p, a) in enumerate(zip(store.payload("passage").tolist(), store.alive.tolist())) if a}
        parts = [store.text(row_of[int(p)])[:max_chars] for p in top if p >= 0]
        return "".join(f"Passage {i + 1}: {p}\n" for i, p in enumerate(parts)) + f"Question: {question}\nAnswer:"

    def generate(self, model, tokenizer, question: str, k: int = 3, method: str = "rerank", max_new_tokens: int = 32) -> str:
        from memstack.generate import SamplingConfig, generate

        ids = tokenizer.encode(self.prompt(question, k, method))
        out = [int(t[0]) for t in generate(model, torch.tensor([ids]), SamplingConfig(max_new_tokens=max_new_tokens))]
        return tokenizer.decode(out)


def retrieval_metrics(ranked: Ranked, gold: Sequence[int], ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """recall@k (the gold passage is among the top k) and MRR (over the retrieved list; 0 if absent)."""
    g = np.asarray(gold)[:, None]
    hit = ranked.idx == g
    out = {f"recall@{k}": float(hit[:, :k].any(1).mean()) for k in ks}
    first = np.where(hit.any(1), hit.argmax(1) + 1, np.inf)
    out["mrr"] = float((1.0 / first).mean())
    out["queries"] = int(len(gold))
    return out
