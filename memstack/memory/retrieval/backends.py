"""Index backends of the datastore, each declaring what it can do.

| backend     | exact | remove                  | GPU | training            |
|-------------|-------|-------------------------|-----|---------------------|
| exact       | yes   | tombstones (masked out) | yes | no                  |
| faiss_flat  | yes   | native (`remove_ids`)   | no  | no                  |
| faiss_ivf   | no    | native (`remove_ids`)   | no  | k-means on the first `train_min` vectors |
| faiss_hnsw  | no    | tombstones + compaction | no  | no                  |

FAISS facts this follows: HNSW cannot remove (the graph would need re-linking: faiss #3339,
#1784), so deleted entries stay in the graph as tombstones the datastore filters out until a
compaction rebuilds it; flat and IVF remove natively (a full pass over the lists); no GPU index
removes (faiss #1818), and this package pins faiss-cpu, so FAISS backends are CPU-only -- the
exact torch backend is the GPU path. An IVF index that has not seen `train_min` vectors yet
keeps them in an exact flat "tail" (LanceDB's brute-force tail), trains once it has enough and
moves them in.

One `FaissIndex` per namespace: a query in one namespace searches only that namespace's index,
so another user's entries cannot come back (the datastore checks the namespace again anyway).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from memstack.memory.retrieval.config import StoreConfig


@dataclass(frozen=True)
class Capabilities:
    exact: bool           # results are the true nearest neighbours
    remove: str           # "native" | "tombstone"
    gpu: bool             # can search on a GPU
    needs_training: bool  # must see data before it indexes (IVF)
    # the distances it returns are computed on the full stored vectors (Flat, IVF-Flat, HNSW-Flat
    # all keep them), so exact re-scoring would recompute the same numbers and over-fetching
    # candidates beyond k finds nothing better (the result set depends on nprobe / efSearch, not
    # on how many are returned while k <= efSearch); a quantized index (PQ, SQ) would say False
    exact_distances: bool = True


CAPABILITIES = {
    "exact": Capabilities(exact=True, remove="tombstone", gpu=True, needs_training=False),
    "faiss_flat": Capabilities(exact=True, remove="native", gpu=False, needs_training=False),
    "faiss_ivf": Capabilities(exact=False, remove="native", gpu=False, needs_training=True),
    "faiss_hnsw": Capabilities(exact=False, remove="tombstone", gpu=False, needs_training=False),
}


def import_faiss():
    try:
        import faiss  # noqa: PLC0415 -- heavy, optional: imported only when a FAISS backend is used
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("FAISS backends need faiss-cpu: pip install 'memstack[retrieval]'") from e
    return faiss


def _any_missing(I: np.ndarray) -> bool:
    """Whether sorted FAISS results (Q, K) hold a -1 (missing ones come last); a scalar read for
    one query (~0.1 us instead of ~1 us for a reduction)."""
    return bool(I[0, -1] < 0) if I.shape[0] == 1 else bool((I[:, -1] < 0).any())


@functools.cache
def _swig_ptr():
    return import_faiss().swig_ptr


class FaissIndex:
    """One namespace's FAISS index. FAISS ids are datastore rows (int64)."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        faiss = import_faiss()
        self.metric = faiss.METRIC_L2 if cfg.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.index = self._new_index()
        self.tail = None               # IVF before training: exact index of the buffered vectors
        self.tail_x: list[np.ndarray] = []
        self.tail_rows: list[np.ndarray] = []
        if cfg.backend == "faiss_ivf":
            self.tail = self._flat()

    # -- construction ----------------------------------------------------------------------------
    def _flat(self):
        faiss = import_faiss()
        base = faiss.IndexFlatL2(self.cfg.dim) if self.cfg.metric == "l2" else faiss.IndexFlatIP(self.cfg.dim)
        return faiss.IndexIDMap2(base)

    def _new_index(self):
        faiss, c = import_faiss(), self.cfg
        if c.backend == "faiss_flat":
            return self._flat()
        if c.backend == "faiss_hnsw":
            h = faiss.IndexHNSWFlat(c.dim, c.hnsw_m, self.metric)
            h.hnsw.efConstruction = c.ef_construction
            h.hnsw.efSearch = c.ef_search
            return faiss.IndexIDMap2(h)
        if c.backend == "faiss_ivf":
            quant = faiss.IndexFlatL2(c.dim) if c.metric == "l2" else faiss.IndexFlatIP(c.dim)
            ivf = faiss.IndexIVFFlat(quant, c.dim, c.nlist, self.metric)
            ivf.nprobe = c.nprobe
            ivf.cp.seed = 1234     # deterministic k-means: a rebuilt store gets the same lists
            self._quant = quant    # keep the quantizer alive as long as the index (SWIG ownership)
            return ivf
        raise ValueError(f"not a FAISS backend: {c.backend!r}")

    @property
    def trained(self) -> bool:
        return self.tail is None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) + (int(self.tail.ntotal) if self.tail is not None else 0)

    # -- updates ---------------------------------------------------------------------------------
    def add(self, x: np.ndarray, rows: np.ndarray) -> None:
        """x (n, d) float32 C-contiguous, rows (n,) int64."""
        if self.tail is None:
            self.index.add_with_ids(x, rows)
            return
        self.tail.add_with_ids(x, rows)
        self.tail_x.append(x)
        self.tail_rows.append(rows)
        if int(self.tail.ntotal) >= self.cfg.ivf_train_min:
            xs, rs = np.concatenate(self.tail_x), np.concatenate(self.tail_rows)
            self.index.train(xs)
            self.index.add_with_ids(xs, rs)
            self.tail, self.tail_x, self.tail_rows = None, [], []

    def remove(self, rows: np.ndarray) -> None:
        """Native removal (flat, IVF). HNSW never gets here: the datastore tombstones instead."""
        faiss = import_faiss()
        sel = faiss.IDSelectorBatch(rows)
        n = self.index.remove_ids(sel)
        if self.tail is not None:
            n += self.tail.remove_ids(sel)
            keep = [~np.isin(r, rows) for r in self.tail_rows]
            self.tail_x = [x[k] for x, k in zip(self.tail_x, keep)]
            self.tail_rows = [r[k] for r, k in zip(self.tail_rows, keep)]
        if n != len(rows):
            raise RuntimeError(f"FAISS removed {n} of {len(rows)} entries; the index and the datastore disagree")

    def rebuild(self, x: np.ndarray, rows: np.ndarray) -> None:
        """Replace the contents (after a compaction renumbered the rows). A trained IVF keeps its
        coarse quantizer; HNSW and flat start over."""
        if self.cfg.backend == "faiss_ivf" and self.trained:
            self.index.reset()
            if len(rows):
                self.index.add_with_ids(x, rows)
            return
        self.__init__(self.cfg)
        if len(rows):
            self.add(x, rows)

    # -- search ----------------------------------------------------------------------------------
    def search(self, q: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
        """q (Q, d) float32 -> (scores (Q, K) higher = closer, sorted; rows (Q, K); -1 where empty)."""
        if self.tail is None and K <= self.index.ntotal and q.dtype == np.float32 and q.flags.c_contiguous:
            # one index, enough entries: FAISS's own sorted answer, without merging (the common
            # case); search_c directly, skipping the Python wrapper's checks and copies (~3 us a call)
            ptr = _swig_ptr()
            n = q.shape[0]
            D, I = np.empty((n, K), np.float32), np.empty((n, K), np.int64)
            self.index.search_c(n, ptr(q), K, ptr(D), ptr(I))
            if self.cfg.metric == "l2":
                np.negative(D, out=D)
            if _any_missing(I):              # HNSW / IVF may find fewer than K
                D[I < 0] = -np.inf
            return D, I
        parts = []
        if self.index.ntotal:
            parts.append(self.index.search(q, min(K, int(self.index.ntotal))))
        if self.tail is not None and self.tail.ntotal:
            parts.append(self.tail.search(q, min(K, int(self.tail.ntotal))))
        Q = q.shape[0]
        if not parts:
            return np.full((Q, K), -np.inf, np.float32), np.full((Q, K), -1, np.int64)
        D = np.concatenate([p[0] for p in parts], 1)
        I = np.concatenate([p[1] for p in parts], 1)
        S = -D if self.cfg.metric == "l2" else D
        S = np.where(I < 0, -np.inf, S).astype(np.float32)
        order = np.argsort(-S, axis=1, kind="stable")[:, :K]
        S, I = np.take_along_axis(S, order, 1), np.take_along_axis(I, order, 1)
        if S.shape[1] < K:
            pad = K - S.shape[1]
            S = np.concatenate([S, np.full((Q, pad), -np.inf, np.float32)], 1)
            I = np.concatenate([I, np.full((Q, pad), -1, np.int64)], 1)
        return S, I

    # -- persistence (FAISS's own binary format, never pickle) ------------------------------------
    def serialize(self) -> np.ndarray | None:
        """The trained index as bytes; None for an untrained IVF (rebuilt from the rows on load)."""
        if not self.trained:
            return None
        return import_faiss().serialize_index(self.index)

    @classmethod
    def deserialize(cls, cfg: StoreConfig, blob: np.ndarray) -> "FaissIndex":
        faiss = import_faiss()
        obj = cls.__new__(cls)
        obj.cfg = cfg
        obj.metric = faiss.METRIC_L2 if cfg.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        obj.index = faiss.deserialize_index(blob)
        obj.tail, obj.tail_x, obj.tail_rows = None, [], []
        if cfg.backend == "faiss_ivf":
            faiss.extract_index_ivf(obj.index).nprobe = cfg.nprobe
        if cfg.backend == "faiss_hnsw":
            faiss.downcast_index(obj.index.index).hnsw.efSearch = cfg.ef_search
        return obj
