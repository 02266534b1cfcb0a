"""RAG as a memory: retrieved passages in the context (EMBED site).

Paper: Lewis et al., arXiv 2005.11401 (RAG); the read follows In-Context RALM (Ram et al.,
arXiv 2302.00083): no reader changes, the passages are simply put in front of the text.
What it stores: nothing per document but the last `query_tokens` tokens it has read (the
query); the passages live in a datastore built by `memstack datastore build --kind rag`
(MiniLM vectors + passage text; rag.py has the retrieval pipeline).
Read: at each segment start the recent tokens are decoded to text and retrieved with (dense,
BM25 or hybrid); the top-k passages are tokenized with the model's tokenizer, cut or padded with
<eot> to `passage_tokens` each, embedded with the backbone's own token embedding
(`StepContext.embed`) and prepended to the segment, so every token of the segment can read
them. Write: the segment's tokens join the query window. The query uses only tokens before
the segment, so no position sees passages chosen with its own future.

Deviations: the passages are fixed per segment (not re-retrieved per token); a row with no
query yet (a document's first segment) gets a prefix of <eot> tokens so that every row of a
batch has the same prefix length; RAG's marginalisation over passages and its trained query
encoder are not implemented (frozen retriever).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from memstack.config import BackboneConfig
from memstack.memory.base import Memory, MemorySpec, Site, StepContext, row_reads
from memstack.memory.retrieval.config import RAGConfig
from memstack.memory.retrieval.namespaces import ForgetsEntries


@dataclass
class RAGState:
    recent: Tensor   # (B, query_tokens) int64: the document's last tokens, right-aligned
    n: Tensor        # (B,) int64: how many of them are real (0 at a document start)


class RAGContext(ForgetsEntries, Memory):
    sites: ClassVar[frozenset[Site]] = frozenset({Site.EMBED})

    def __init__(self, cfg: RAGConfig, backbone: BackboneConfig):
        super().__init__(cfg, backbone)
        self.pipeline = self.tokenizer = self.store = None
        self._ids: dict[int, list[int]] = {}   # passage -> token ids: a cache of a pure function of the store
        if cfg.store is not None:
            from memstack.data.tokenizers import get_tokenizer
            from memstack.memory.retrieval.embedder import Embedder
            from memstack.memory.retrieval.rag import DenseRetriever, RAGPipeline
            from memstack.memory.retrieval.store import Datastore

            emb = Embedder()
            self.store = Datastore.open(cfg.store, expect_fingerprint=emb.fingerprint)
            self.tokenizer = get_tokenizer(cfg.tokenizer)
            self.pipeline = RAGPipeline(DenseRetriever(self.store, emb, cfg.namespace), None, pool=max(10, 4 * cfg.k))
            self._refresh()
            if cfg.method != "dense":
                self.pipeline.bm25 = self._bm25_of((cfg.namespace,))

    def _refresh(self) -> None:
        """Rebuild what is derived from the store's live entries (after a forget: nothing of the
        forgotten namespace may stay in a cache)."""
        alive = self.store.alive.tolist()
        self._row_of = {int(p): r for r, (p, a) in enumerate(zip(self.store.payload("passage").tolist(), alive)) if a}
        self._ids.clear()
        self._bm25: dict[tuple[str, ...], object] = {}

    def _bm25_of(self, reads: tuple[str, ...]):
        """BM25 over the live passages of the namespaces `reads` (one index per namespace set, built
        on first use): lexical retrieval keeps the same walls as the dense store."""
        if reads not in self._bm25:
            from memstack.memory.retrieval.rag import BM25Retriever

            codes = [self.store.namespaces.index(n) for n in reads if n in self.store.namespaces]
            ns, alive = self.store._ns[: self.store.n_rows].tolist(), self.store.alive.tolist()
            rows = [r for r, (c, a) in enumerate(zip(ns, alive)) if a and c in codes]
            passages = self.store.payload("passage").tolist()
            self._bm25[reads] = BM25Retriever([self.store.text(r) for r in rows], ids=[passages[r] for r in rows]) \
                if rows else None
        return self._bm25[reads]

    def forget(self, namespace: str) -> int:
        n = super().forget(namespace)          # the entries, removed and persisted (namespaces.py)
        if self.store is not None:
            self._refresh()
        return n

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> RAGState:
        return RAGState(torch.zeros(batch, self.cfg.query_tokens, dtype=torch.long, device=device),
                        torch.zeros(batch, dtype=torch.long, device=device))

    def reset(self, state: RAGState, mask: Tensor) -> RAGState:
        return RAGState(state.recent, state.n.masked_fill(mask, 0))

    def spec(self, dtype: torch.dtype = torch.float32) -> MemorySpec:
        return MemorySpec(fixed_bytes=8 * self.cfg.query_tokens + 8, dtype_bytes=torch.empty((), dtype=dtype).element_size())

    def make_identity(self) -> bool:
        return self.pipeline is None   # without a store nothing is ever put in the context

    def embed_tokens(self, seg_start: bool, seg_end: bool) -> tuple[int, int]:
        return (self.cfg.k * self.cfg.passage_tokens if seg_start and self.pipeline is not None else 0), 0

    def _retrieve(self, queries: list[str], reads: tuple[str, ...]):
        """Top passages of `queries` within the namespaces `reads` (one shared store; the engine's
        per-row namespaces reach here through StepContext.reads_of)."""
        from memstack.memory.retrieval.rag import DenseRetriever, RAGPipeline

        pipe = self.pipeline
        ns = reads[0] if len(reads) == 1 else reads
        bm = self._bm25_of(reads) if self.cfg.method != "dense" else None
        if self.cfg.method != "dense" and bm is None:            # no passage in these namespaces
            return [[-1] * self.cfg.k for _ in queries]
        pipe = RAGPipeline(DenseRetriever(pipe.dense.store, pipe.dense.embedder, ns), bm, pipe.pool, pipe.alpha)
        return pipe.retrieve(queries, self.cfg.k, self.cfg.method).idx

    def passage_ids(self, queries: list[str], namespaces: list | None = None) -> list[list[int]]:
        """Token ids of the prefix for each query ('' = no query: all <eot>)."""
        cfg, eot = self.cfg, self.tokenizer.eot_id
        out = [[eot] * (cfg.k * cfg.passage_tokens) for _ in queries]
        asked = [i for i, q in enumerate(queries) if q.strip()]
        if not asked:
            return out
        namespaces = [row_reads(n) or (cfg.namespace,) for n in (namespaces or [None] * len(queries))]
        top: dict[int, list[int]] = {}
        for ns in dict.fromkeys(namespaces[i] for i in asked):
            group = [i for i in asked if namespaces[i] == ns]
            for i, row in zip(group, self._retrieve([queries[i] for i in group], ns)):
                top[i] = row
        for i in asked:
            row = top[i]
            ids: list[int] = []
            for p in row:
                if p < 0:
                    seg = []
                else:
                    if int(p) not in self._ids:
                        self._ids[int(p)] = self.tokenizer.encode(self.pipeline.dense.store.text(self._row_of[int(p)]))
                    seg = self._ids[int(p)][: cfg.passage_tokens]
                ids += seg + [eot] * (cfg.passage_tokens - len(seg))
            out[i] = ids
        return out

    def embed(self, x: Tensor, state: RAGState, ctx: StepContext) -> tuple[Tensor | None, Tensor | None, Any]:
        prefix = None
        if ctx.any_start and self.pipeline is not None:
            if ctx.embed is None:
                raise RuntimeError("the rag memory needs the backbone's token embedding (StepContext.embed)")
            start = ctx.seg_start.cpu().tolist()                       # only rows opening a segment retrieve
            queries = [self.tokenizer.decode(r[len(r) - int(n):].tolist()) if int(n) and s else ""
                       for r, n, s in zip(state.recent.cpu(), state.n.cpu(), start)]
            ids = torch.tensor(self.passage_ids(queries, ctx.reads_of(self.cfg.namespace)), dtype=torch.long,
                               device=x.device)                                                 # (B, k * passage_tokens)
            prefix = ctx.embed(ids).to(x.dtype)                                                # (B, P, D)
        Q = self.cfg.query_tokens
        recent = torch.cat([state.recent, ctx.tokens], 1)[:, -Q:].clone()
        n = (state.n + ctx.n_tokens).clamp(max=Q)
        return prefix, None, RAGState(recent, n)
