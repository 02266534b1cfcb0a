"""A trainable dense retriever over a frozen passage index: the shipped MiniLM (all-MiniLM-L6-v2)
as a query encoder that receives gradient, for RAG (arXiv 2005.11401) and ATLAS (arXiv 2208.03299).

What it holds: a trainable copy of the embedder (`encoder`, a sentence-transformers module:
BERT -> mean pooling -> L2 normalisation) and a `Datastore` of passage vectors written by the
FROZEN original (its fingerprint is checked). Scores are cosine / `temperature`; the retrieval
distribution is the softmax over the k passages returned.

Two ways to train it (`mode`):
- "query" (RAG's setting, ATLAS's "query-side fine-tuning"): only the query tower changes; the
  passage vectors are the frozen copy's, so the index is never stale and costs nothing to keep.
  Gradient: d logits / d q = d_z / tau.
- "rerank" (ATLAS's over-retrieve-and-re-rank, `--retrieve_with_rerank`): one shared tower for
  queries and passages (ATLAS's Contriever is shared too) is trained, so the index -- still the
  frozen copy's vectors -- goes stale. Each call retrieves `candidates` passages from the stale
  index with the current query vector, re-embeds all of them with the CURRENT tower (no grad),
  keeps the best k by the current scores, and re-embeds those k with gradient, so both towers
  learn. The re-embedding time and count are accumulated in `stats` (the cost of staying fresh;
  a full index refresh would re-embed every passage instead). Deviation: the stale index is
  never refreshed during our short few-shot runs (ATLAS refreshes every few hundred steps in
  pre-training); candidates the stale index ranks below `candidates` cannot come back.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from memstack.memory.retrieval.store import Datastore, DatastoreError

MODES = ("query", "rerank")


@dataclass
class Retrieved:
    passages: Tensor      # (B, k) int64: passage ids (the store's "passage" payload)
    rows: Tensor          # (B, k) int64: store rows
    logits: Tensor        # (B, k) float32: cosine / temperature, differentiable w.r.t. the trained tower(s)


@dataclass
class RetrieverStats:
    calls: int = 0
    rerank_seconds: float = 0.0        # re-embedding candidates with the current tower
    reembedded: int = 0                # passages re-embedded
    query_seconds: float = 0.0         # embedding the questions (with gradient)
    extra: dict = field(default_factory=dict)


class TrainableRetriever(nn.Module):
    def __init__(self, store: Datastore, embedder, mode: str = "query", candidates: int = 16, temperature: float = 0.05,
                 namespace: str = "default"):
        super().__init__()
        r = []
        if mode not in MODES:
            r.append(f"mode must be one of {MODES}, got {mode!r}")
        if not temperature > 0:
            r.append(f"temperature must be > 0, got {temperature}")
        if candidates < 1:
            r.append(f"candidates must be >= 1, got {candidates}")
        if store.fingerprint != embedder.fingerprint:
            r.append(f"the passage index was embedded by {store.fingerprint!r}, the retriever starts from "
                     f"{embedder.fingerprint!r}: the frozen copy must be the index's own encoder")
        if "passage" not in store.schema or not store.has_text:
            r.append("the store must hold a 'passage' payload and the passage texts (memstack datastore build --kind rag)")
        if r:
            raise DatastoreError(r, "cannot build the trainable retriever")
        self.store, self.mode, self.candidates, self.temperature, self.namespace = store, mode, candidates, temperature, namespace
        self.encoder = copy.deepcopy(embedder.model)        # trainable; embedder.model stays the frozen copy
        self.dim = embedder.dim
        self.stats = RetrieverStats()

    def embed(self, texts: Sequence[str]) -> Tensor:
        """(n, dim) unit vectors from the trainable tower; differentiable when grad is enabled."""
        enc = self.encoder
        feats = enc.preprocess(list(texts)) if hasattr(enc, "preprocess") else enc.tokenize(list(texts))
        dev = next(enc.parameters()).device
        feats = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
        return self.encoder(feats)["sentence_embedding"].float()

    def _texts(self, rows: Tensor) -> list[str]:
        return [self.store.text(int(r)) for r in rows.flatten().tolist()]

    def retrieve(self, questions: Sequence[str], k: int) -> Retrieved:
        if len(self.store) < k:
            raise DatastoreError(f"the store holds {len(self.store)} passages, fewer than k={k}", "refused retrieval")
        self.stats.calls += 1
        t0 = time.perf_counter()
        q = self.embed(questions)                                                     # (B, d)
        self.stats.query_seconds += time.perf_counter() - t0
        B = q.shape[0]
        L = max(k, self.candidates) if self.mode == "rerank" else k
        res = self.store.search(q.detach(), L, self.namespace)                        # stale / frozen index
        rows = res.rows[:, :L]                                                        # (B, L)
        if self.mode == "query":
            rows = rows[:, :k]
            d = self.store.keys[rows].float()                                         # (B, k, d) frozen vectors
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                cur = self.embed(self._texts(rows)).view(B, L, -1)                    # current passage tower
            order = (q.detach()[:, None] * cur).sum(-1).argsort(-1, descending=True)[:, :k]
            rows = rows.gather(1, order)
            d = self.embed(self._texts(rows)).view(B, k, -1)                          # top-k with gradient
            self.stats.rerank_seconds += time.perf_counter() - t0
            self.stats.reembedded += B * (L + k)
        logits = (q[:, None, :] * d.to(q.dtype)).sum(-1) / self.temperature          # (B, k)
        passages = self.store.payload("passage")[rows]
        return Retrieved(passages, rows, logits)
