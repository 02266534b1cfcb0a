"""The retrieval datastore: one store behind kNN-LM, RETRO and RAG.

An entry is (key vector, payload, document id, namespace), with a stable external id:
- kNN-LM: key = the LM's final hidden state, payload {"token": next token id}
- RETRO:  key = frozen chunk embedding, payload {"tokens": chunk + continuation (2m ids)}
- RAG:    key = embedder vector of a passage, payload {"passage": passage index} (+ its text)
The Memorizing Transformer keeps its per-document (key, value) memory in the model state and
searches it with the same exact-search op (ops/knn), see memorizing.py for why.

Online updates. `add` appends; `delete` removes natively where the backend can (FAISS flat,
IVF) and otherwise tombstones (exact torch, FAISS HNSW: the rows are masked out of every
result); `compact` drops tombstoned rows and rebuilds the indexes; ids stay stable across
compaction. Every update validates *all* of its input first and lists every problem at once;
nothing is changed by a refused call.

Search is two-stage where it needs to be: a backend whose distances are approximate would return
`candidates` neighbours per query, re-scored exactly on the stored full-precision keys (kNN-LM's
quality depends on it: 16.12 exact vs 16.50 quantized-distance test perplexity in the paper).
Today's FAISS backends (Flat, IVF-Flat, HNSW-Flat) keep full vectors, so their distances are
already exact over the stored keys (`Capabilities.exact_distances`): the fast path skips stage 2
and fetches k, more only while tombstones or an excluded document eat them (the torch reference
keeps both stages; tests check that they agree). Namespaces are hard
walls: each namespace has its own FAISS index, the exact backend masks by namespace, and every
result is checked against the query's namespace before it is returned.

Two implementations of the FAISS search: `_search_faiss` (torch, any namespace per query, any
device: the reference) and `_search_faiss_fast` (numpy, one namespace, CPU: the path `search`
takes when it can; tests compare them). The fast path exists for single queries, where ~20
small torch ops cost ~25x FAISS's own HNSW search (benchmarks/retrieval/perf.py).

Persistence (no pickle; the code is in store_io.py): a directory with `manifest.json` (format version, config, the
fingerprint of the model or embedder that produced the keys, namespaces, next id, schema, and
the SHA-256 of the tensor file; sealed: memstack/atomic.py) and one content-named safetensors
file holding every column, the texts as UTF-8 bytes and the FAISS indexes in FAISS's own binary
format. Written with memstack/atomic.py under the store's writer lock: a crash at any point
leaves the previous version readable, and what it left (temporaries, an unreferenced tensor
file) is removed the next time the store is opened or saved. `Datastore.open(path,
expect_fingerprint=...)` refuses a store built by another model, any edited or corrupted file,
and columns that contradict the manifest (ids out of order or not below `next_id`, namespace
codes out of range, a tombstone count that does not match), each with the file named.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from memstack.config import to_dict
from memstack.errors import MemstackError
from memstack.memory.retrieval.backends import CAPABILITIES, Capabilities, FaissIndex, _any_missing
from memstack.memory.retrieval.config import StoreConfig
from memstack.ops.knn import knn_search

STORE_FORMAT = 2
KIND = "memstack-datastore"
FORGOTTEN = "\x00forgotten:"     # the name a forgotten namespace's code keeps (no request can name it)
_MANIFEST_FIELDS = {"config": dict, "fingerprint": str, "namespaces": list, "next_id": int, "rows": int,
                    "tombstones": int, "schema": dict, "text": bool, "tensors": str, "sha256": str}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
           "int16": torch.int16, "uint8": torch.uint8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class DatastoreError(MemstackError, ValueError):
    """Bad input to a datastore, or a store file that is corrupted / from another model.
    Carries every reason in `reasons`; the store is unchanged."""

    def __init__(self, reasons: list[str] | str, what: str = "datastore"):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"{what} ({len(self.reasons)} problem(s)):\n{lines}")


@dataclass
class SearchResult:
    scores: Tensor   # (Q, k) float32, higher = closer (-||q-k||^2 or q.k); -inf where empty
    ids: Tensor      # (Q, k) int64 stable entry ids; -1 where empty
    rows: Tensor     # (Q, k) int64 rows (valid until the next compaction); -1 where empty


def model_fingerprint(model: torch.nn.Module, what: str = "") -> str:
    """sha256 over a model's backbone weights (memories excluded) and its backbone config:
    what a datastore of hidden states depends on."""
    h = hashlib.sha256(json.dumps(to_dict(model.cfg.backbone), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("memory."):
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return f"memstack-model:{h.hexdigest()[:24]}" + (f":{what}" if what else "")


class Datastore:
    """See the module docstring. `payload`: name -> (dtype name, trailing shape) of each column."""

    def __init__(self, cfg: StoreConfig, fingerprint: str, payload: dict[str, tuple[str, Sequence[int]]] | None = None,
                 text: bool = False, device: str | torch.device = "cpu"):
        reasons = [] if fingerprint else ["fingerprint must name the model or embedder that produces the keys"]
        schema = {}
        for name, (dt, shape) in (payload or {}).items():
            if dt not in _DTYPES:
                reasons.append(f"payload {name!r}: dtype {dt!r} is not one of {sorted(_DTYPES)}")
            schema[name] = (dt, tuple(int(s) for s in shape))
        if reasons:
            raise DatastoreError(reasons, "invalid datastore")
        self.cfg, self.fingerprint, self.schema, self.has_text = cfg, fingerprint, schema, text
        self.device = torch.device(device)
        self.caps: Capabilities = CAPABILITIES[cfg.backend]
        self._fast = cfg.backend != "exact" and self.device.type == "cpu"    # search's numpy fast path applies
        self.namespaces: list[str] = []
        self._ns_code: dict[str, int] = {}
        self._n = 0              # filled rows
        self._dead = 0           # tombstoned rows among them
        self.next_id = 0
        cap = 0
        self._keys = torch.empty(cap, cfg.dim, dtype=_DTYPES[cfg.dtype], device=self.device)
        self._key_sq = torch.empty(cap, dtype=torch.float32, device=self.device)
        self._ids = torch.empty(cap, dtype=torch.long, device=self.device)
        self._doc = torch.empty(cap, dtype=torch.long, device=self.device)
        self._ns = torch.empty(cap, dtype=torch.long, device=self.device)
        self._alive = torch.empty(cap, dtype=torch.bool, device=self.device)
        self._payload = {n: torch.empty(cap, *s, dtype=_DTYPES[d], device=self.device) for n, (d, s) in schema.items()}
        self._texts: list[str] = []
        self._index: dict[int, FaissIndex] = {}
        self.cleaned: list[Path] = []     # what `open` removed (left by an interrupted save)

    # ------------------------------------------------------------------------------- views
    def __len__(self) -> int:
        """Live entries (tombstones excluded)."""
        return self._n - self._dead

    @property
    def n_rows(self) -> int:
        return self._n

    @property
    def n_tombstones(self) -> int:
        return self._dead

    @property
    def keys(self) -> Tensor:
        return self._keys[: self._n]

    @property
    def ids(self) -> Tensor:
        return self._ids[: self._n]

    @property
    def doc(self) -> Tensor:
        return self._doc[: self._n]

    @property
    def alive(self) -> Tensor:
        return self._alive[: self._n]

    def payload(self, name: str) -> Tensor:
        return self._payload[name][: self._n]

    def text(self, row: int) -> str:
        return self._texts[row]

    def count(self, namespace: str) -> int:
        code = self._ns_code.get(namespace)
        if code is None:
            return 0
        return int(((self._ns[: self._n] == code) & self.alive).sum())

    def to(self, device: str | torch.device) -> "Datastore":
        """Move the columns (and so exact search) to `device`; FAISS indexes stay on the CPU."""
        self.device = torch.device(device)
        self._fast = self.cfg.backend != "exact" and self.device.type == "cpu"
        for name in ("_keys", "_key_sq", "_ids", "_doc", "_ns", "_alive"):
            setattr(self, name, getattr(self, name).to(self.device))
        self._payload = {n: t.to(self.device) for n, t in self._payload.items()}
        return self

    # ------------------------------------------------------------------------------- updates
    def _check_keys(self, keys: object, what: str = "keys") -> list[str]:
        if not isinstance(keys, Tensor):
            return [f"{what} must be a torch.Tensor, got {type(keys).__name__}"]
        r = []
        if keys.dim() != 2 or keys.shape[-1] != self.cfg.dim:
            r.append(f"{what} must have shape (n, {self.cfg.dim}), got {tuple(keys.shape)}")
        if not keys.is_floating_point():
            r.append(f"{what} must be floating point (float16/bfloat16/float32/float64), got {keys.dtype}")
        elif keys.numel() and not bool(torch.isfinite(keys).all()):
            r.append(f"{what} contain NaN or infinite values ({int((~torch.isfinite(keys)).any(-1).sum())} rows)")
        return r

    def add(self, keys: Tensor, payload: dict[str, Tensor] | None = None, doc: Tensor | Sequence[int] | None = None,
            namespace: str = "default", texts: Sequence[str] | None = None) -> Tensor:
        """Append entries; returns their ids (n,). Every problem is reported at once and nothing
        is stored if there is any."""
        payload = payload or {}
        r = self._check_keys(keys)
        n = keys.shape[0] if isinstance(keys, Tensor) and keys.dim() >= 1 else -1
        for name in sorted(set(self.schema) - set(payload)):
            r.append(f"payload {name!r} is missing (this store holds {sorted(self.schema)})")
        for name in sorted(set(payload) - set(self.schema)):
            r.append(f"payload {name!r} is not a column of this store (it holds {sorted(self.schema)})")
        for name, t in payload.items():
            if name not in self.schema:
                continue
            dt, shape = self.schema[name]
            if not isinstance(t, Tensor):
                r.append(f"payload {name!r} must be a tensor, got {type(t).__name__}")
                continue
            if tuple(t.shape) != (n, *shape):
                r.append(f"payload {name!r} must have shape {(n, *shape)}, got {tuple(t.shape)}")
            if t.dtype != _DTYPES[dt]:
                r.append(f"payload {name!r} must be {dt}, got {t.dtype}")
        if doc is not None:
            doc = torch.as_tensor(doc)
            if doc.shape != (n,) or doc.is_floating_point():
                r.append(f"doc must be {n} integer ids, got shape {tuple(doc.shape)} dtype {doc.dtype}")
        if not isinstance(namespace, str) or not namespace or namespace.startswith(FORGOTTEN):
            r.append(f"namespace must be a non-empty string (not a forgotten one's), got {namespace!r}")
        if self.has_text:
            if texts is None or len(texts) != n or not all(isinstance(s, str) for s in texts):
                r.append(f"texts: this store keeps text; pass {n} strings")
        elif texts is not None:
            r.append("texts given, but this store was created without text")
        if r:
            raise DatastoreError(r, "refused add")
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        code = self._namespace(namespace)
        a, b = self._n, self._n + n
        self._grow(b)
        k = keys.detach().to(self.device, _DTYPES[self.cfg.dtype])
        self._keys[a:b] = k
        self._key_sq[a:b] = (k.float() ** 2).sum(-1)
        ids = torch.arange(self.next_id, self.next_id + n, device=self.device)
        self._ids[a:b] = ids
        self._doc[a:b] = doc.to(self.device, torch.long) if doc is not None else -1
        self._ns[a:b] = code
        self._alive[a:b] = True
        for name, t in payload.items():
            self._payload[name][a:b] = t.to(self.device)
        if self.cfg.backend != "exact":
            try:
                self._faiss(code).add(np.ascontiguousarray(k.float().cpu().numpy()), np.arange(a, b, dtype=np.int64))
            except BaseException:
                self._rebuild_index(code)   # leave the index as the columns (unchanged: _n not advanced)
                raise
        if self.has_text:
            self._texts.extend(texts)
        self._n = b
        self.next_id += n
        return ids.cpu()

    def _namespace(self, name: str) -> int:
        if name not in self._ns_code:
            self._ns_code[name] = len(self.namespaces)
            self.namespaces.append(name)
        return self._ns_code[name]

    def _faiss(self, code: int) -> FaissIndex:
        if code not in self._index:
            self._index[code] = FaissIndex(self.cfg)
        return self._index[code]

    def _grow(self, need: int) -> None:
        cap = self._keys.shape[0]
        if need <= cap:
            return
        cap = max(need, 2 * cap, 1024)

        def grown(t: Tensor) -> Tensor:
            new = t.new_zeros(cap, *t.shape[1:])
            new[: self._n] = t[: self._n]
            return new

        for name in ("_keys", "_key_sq", "_ids", "_doc", "_ns", "_alive"):
            setattr(self, name, grown(getattr(self, name)))
        self._payload = {n: grown(t) for n, t in self._payload.items()}

    def _rows_of(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, found) for external ids; ids are increasing along the rows (append-only,
        compaction keeps the order), so this is a binary search."""
        col = self.ids
        rows = torch.searchsorted(col, ids.to(col.device)).clamp(max=max(self._n - 1, 0))
        found = (rows < self._n) & (col[rows] == ids.to(col.device)) if self._n else torch.zeros_like(ids, dtype=torch.bool)
        return rows, found

    def delete(self, ids: Tensor | Sequence[int], namespace: str | None = None) -> None:
        """Delete entries by id. Unknown ids, ids already deleted, duplicates and (with
        `namespace`) ids of another namespace are all refused at once; nothing is deleted then."""
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.dim() != 1:
            raise DatastoreError(f"ids must be a 1-D sequence of integers, got shape {tuple(ids.shape)} dtype {ids.dtype}",
                                 "refused delete")
        ids = ids.long()
        rows, found = self._rows_of(ids)
        r = []
        unknown = ids[~found.cpu()].tolist()
        if unknown:
            r.append(f"unknown ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''} ({len(unknown)})")
        dead = ids[(found & ~self.alive[rows]).cpu()].tolist() if self._n else []
        if dead:
            r.append(f"ids already deleted {dead[:10]}{' ...' if len(dead) > 10 else ''} ({len(dead)})")
        if len(set(ids.tolist())) != len(ids):
            r.append("ids contain duplicates")
        if namespace is not None and self._n:
            code = self._ns_code.get(namespace, -1)
            other = ids[(found & (self._ns[rows] != code)).cpu()].tolist()
            if other:
                r.append(f"ids {other[:10]} do not belong to namespace {namespace!r}")
        if r:
            raise DatastoreError(r, "refused delete")
        if not len(ids):
            return
        rows = rows[found]
        if self.caps.remove == "native":
            for code in self._ns[rows].unique().tolist():
                sel = rows[self._ns[rows] == code].cpu().numpy().astype(np.int64)
                self._index[code].remove(sel)
        self._alive[rows] = False
        self._dead += len(rows)
        if self.cfg.compact_at and self._dead > self.cfg.compact_at * self._n:
            self.compact()

    def forget(self, namespace: str) -> int:
        """Remove every entry of `namespace` for good (forgetting a user): its rows' keys,
        payloads, document ids and texts are overwritten with zeros / "" and marked deleted, its
        index is dropped and its name replaced by an anonymous placeholder. Other namespaces'
        rows, indexes and results are untouched (nothing is renumbered or rebuilt); `compact`
        later reclaims the rows. Returns how many live entries it had. In memory only: `save`
        persists it (the served memories do: retrieval/namespaces.py)."""
        code = self._ns_code.pop(namespace, None)
        if code is None:
            return 0
        rows = (self._ns[: self._n] == code).nonzero().flatten()
        live = int(self._alive[rows].sum())
        for t in (self._keys, self._key_sq, *self._payload.values()):
            t[rows] = 0
        self._doc[rows] = -1
        self._alive[rows] = False
        self._dead += live
        if self.has_text:
            for r in rows.tolist():
                self._texts[r] = ""
        self._index.pop(code, None)
        self.namespaces[code] = f"{FORGOTTEN}{code}"
        self._ns_code[self.namespaces[code]] = code
        return live

    def compact(self) -> None:
        """Drop tombstoned rows for good and rebuild the indexes (ids are kept)."""
        if not self._dead:
            return
        keep = self.alive.clone()
        n = int(keep.sum())
        for name in ("_keys", "_key_sq", "_ids", "_doc", "_ns", "_alive"):
            t = getattr(self, name)
            t[:n] = t[: self._n][keep].clone()
        for t in self._payload.values():
            t[:n] = t[: self._n][keep].clone()
        if self.has_text:
            kl = keep.tolist()
            self._texts = [s for s, k in zip(self._texts, kl) if k]
        self._n, self._dead = n, 0
        for code in list(self._index):
            self._rebuild_index(code)

    def _rebuild_index(self, code: int) -> None:
        rows = (self._ns[: self._n] == code).nonzero().flatten()
        x = np.ascontiguousarray(self._keys[rows].float().cpu().numpy())
        self._faiss(code).rebuild(x, rows.cpu().numpy().astype(np.int64))

    # ------------------------------------------------------------------------------- search
    def search(self, q: Tensor, k: int, namespace: str | Sequence[str] = "default",
               exclude_doc: Tensor | None = None, candidates: int | None = None) -> SearchResult:
        """Top-k live entries per query within the query's namespace (one name, or one per
        query; a query's entry may be a tuple of names: the top-k of their union, e.g. a user's
        and a task's entries). exclude_doc (Q,): entries of that document id are skipped (RETRO's
        same-document filter; -1 = none)."""
        if not isinstance(namespace, str) and any(isinstance(n, tuple) for n in namespace):
            return self._search_union(q, k, list(namespace), exclude_doc, candidates)
        if self._fast and type(namespace) is str and type(q) is Tensor:
            qn = self._fast_queries(q, k, exclude_doc)
            if qn is not None:
                # the fast path: one namespace, CPU, input already valid (the common single-query call)
                return self._search_faiss_fast(qn, k, namespace, exclude_doc, candidates)
        r = self._check_keys(q, "queries")
        if k < 1:
            r.append(f"k must be >= 1, got {k}")
        Q = q.shape[0] if isinstance(q, Tensor) and q.dim() == 2 else 0
        names = [namespace] * Q if isinstance(namespace, str) else list(namespace)
        if len(names) != Q:
            r.append(f"{len(names)} namespaces for {Q} queries")
        if exclude_doc is not None and tuple(exclude_doc.shape) != (Q,):
            r.append(f"exclude_doc must have shape ({Q},), got {tuple(exclude_doc.shape)}")
        if r:
            raise DatastoreError(r, "refused search")
        codes = torch.tensor([self._ns_code.get(n, -1) for n in names], dtype=torch.long, device=self.device)
        qd = q.detach().to(self.device, torch.float32)
        excl = exclude_doc.to(self.device, torch.long) if exclude_doc is not None else None
        if self.cfg.backend == "exact":
            return self._search_exact(qd, k, codes, excl)
        return self._search_faiss(qd, k, codes, excl, candidates)

    def _search_union(self, q: Tensor, k: int, names: list, exclude_doc: Tensor | None,
                      candidates: int | None) -> SearchResult:
        """Each query over the union of its namespaces: one search per position in the tuples
        (a query with fewer names searches none there), the k best of the candidates merged."""
        reads = [tuple(dict.fromkeys((n,) if isinstance(n, str) else n)) for n in names]
        if any(not r or not all(isinstance(x, str) for x in r) for r in reads):
            raise DatastoreError("a query's namespaces must be a name or a non-empty tuple of names", "refused search")
        parts = [self.search(q, k, [r[j] if j < len(r) else "" for r in reads], exclude_doc, candidates)
                 for j in range(max(map(len, reads), default=1))]             # "" names no namespace: empty
        s, pick = torch.cat([p.scores for p in parts], 1).topk(k, dim=1)       # (Q, k) of (Q, L * k)
        return SearchResult(s, torch.cat([p.ids for p in parts], 1).gather(1, pick),
                            torch.cat([p.rows for p in parts], 1).gather(1, pick))

    def _fast_queries(self, q: Tensor, k: object, exclude_doc: Tensor | None) -> np.ndarray | None:
        """q as a numpy view if the fast path may take it (CPU float32 (Q, dim), finite, int k >= 1,
        exclude_doc (Q,) or None); None sends the call down the validating path, which reports."""
        if q.dtype is not torch.float32 or not q.is_cpu or q.dim() != 2 or q.shape[1] != self.cfg.dim:
            return None
        if type(k) is not int or k < 1:
            return None
        if exclude_doc is not None and (type(exclude_doc) is not Tensor or tuple(exclude_doc.shape) != (q.shape[0],)
                                        or exclude_doc.is_floating_point()):
            return None
        qn = (q.detach() if q.requires_grad else q).numpy()
        # finite iff the sum is (NaN and inf propagate; a finite overflow only sends the call
        # down the validating path, which accepts it): one reduction instead of isfinite + all
        return qn if math.isfinite(qn.sum()) else None

    def _np_columns(self) -> tuple[np.ndarray, ...]:
        """numpy views (alive, ns, doc, ids, keys) sharing memory with the torch columns; rebuilt
        when the columns are reallocated (growth, a device move)."""
        cache = getattr(self, "_np_cache", None)
        if cache is None or cache[0] is not self._alive:
            views = tuple(t.numpy() for t in (self._alive, self._ns, self._doc, self._ids, self._keys))
            cache = self._np_cache = (self._alive, views)
        return cache[1]

    def _valid(self, codes: Tensor, excl: Tensor | None) -> Tensor | None:
        """Which rows each query may see; None = every row (the common case of one namespace, no
        tombstones, no exclusion: no (N,) mask to build and apply, measured ~40% of a batch-1 exact
        search over 1M keys)."""
        if excl is None and self._dead == 0 and len(self._ns_code) == 1 and bool((codes == 0).all()):
            return None
        ns, alive = self._ns[: self._n], self.alive
        if excl is None and bool((codes == codes[0]).all()):
            return alive & (ns == codes[0])                              # (N,): one namespace for all
        v = alive[None] & (ns[None] == codes[:, None])                  # (Q, N)
        if excl is not None:
            v = v & ((self._doc[: self._n][None] != excl[:, None]) | (excl[:, None] < 0))
        return v

    def _search_exact(self, q: Tensor, k: int, codes: Tensor, excl: Tensor | None) -> SearchResult:
        if not self._n or not len(q):
            return self._empty(len(q), k)
        s, rows = knn_search(q, self.keys, k, self.cfg.metric, self._valid(codes, excl), key_sq=self._key_sq[: self._n])
        return self._result(s, rows, codes)

    def _search_faiss(self, q: Tensor, k: int, codes: Tensor, excl: Tensor | None, candidates: int | None) -> SearchResult:
        out_s = torch.full((len(q), k), float("-inf"), device=self.device)
        out_r = torch.full((len(q), k), -1, dtype=torch.long, device=self.device)
        base = candidates or self.cfg.candidates or (k if self.caps.exact else 4 * k)
        for code in codes.unique().tolist():
            if code < 0 or code not in self._index:
                continue
            sel = (codes == code).nonzero().flatten()
            index = self._index[code]
            qn = np.ascontiguousarray(q[sel].cpu().numpy())
            K = max(base, k)
            while True:
                S, I = index.search(qn, K)
                rows = torch.from_numpy(I).to(self.device)
                ok = rows >= 0
                rc = rows.clamp(min=0)
                ok &= self._alive[rc] & (self._ns[rc] == code)
                if excl is not None:
                    e = excl[sel][:, None]
                    ok &= (self._doc[rc] != e) | (e < 0)
                short = bool((ok.sum(1) < k).any())
                if not short or K >= index.ntotal:
                    break
                K = min(2 * K, index.ntotal)   # tombstones / excluded docs ate the candidates: fetch more
            if self.cfg.rescore:
                kq = self._keys[rc].float()                              # (Qs, K, d) exact re-scoring
                qs = q[sel][:, None, :]
                s = -((qs - kq) ** 2).sum(-1) if self.cfg.metric == "l2" else (qs * kq).sum(-1)
            else:
                s = torch.from_numpy(S).to(self.device)
            s = s.masked_fill(~ok, float("-inf"))
            kk = min(k, s.shape[1])
            ts, ti = s.topk(kk, dim=1)
            out_s[sel, :kk] = ts
            out_r[sel, :kk] = torch.where(ts > float("-inf"), rows.gather(1, ti), -1)
        return self._result(out_s, out_r, codes)

    def _search_faiss_fast(self, q: np.ndarray, k: int, namespace: str, exclude_doc: Tensor | None,
                           candidates: int | None) -> SearchResult:
        """`_search_faiss` for one namespace on the CPU, in numpy: the same result (tests compare
        them) without ~20 small torch ops per call. Profiled at batch 1 over a 50k-entry HNSW
        store: the torch path spent ~370 us around FAISS's ~13 us (torch op dispatch, a (Q,)
        namespace tensor, unique(), masks, re-scoring, the final wall check)."""
        Q = q.shape[0]
        code = self._ns_code.get(namespace, -1)
        index = self._index.get(code)
        if index is None or not Q:
            return self._empty(Q, k)
        alive, ns, doc, ids_col, keys = self._np_columns()
        excl = exclude_doc.detach().cpu().numpy().astype(np.int64, copy=False) if exclude_doc is not None else None
        plain = self.caps.exact or self.caps.exact_distances
        K = max(candidates or self.cfg.candidates or (k if plain else 4 * k), k)
        filtered = self._dead > 0 or excl is not None
        rescore = self.cfg.rescore and not self.caps.exact_distances
        if not filtered and not rescore and K == k:
            # nothing to filter, nothing to re-score: FAISS's sorted answer is the result
            S, rows = index.search(q, k)
            hit = rows >= 0 if _any_missing(rows) else None
        else:
            S, rows = self._fast_candidates(index, q, k, K, alive, doc, excl, filtered, rescore, keys)
            hit = rows >= 0
        # the wall between namespaces, checked once more on what is about to be returned (with one
        # namespace and no tombstones it cannot fail: every indexed row is live and in it)
        if len(self.namespaces) > 1 or self._dead:
            h = rows >= 0
            rc = rows[h]
            if not (ns[rc] == code).all() or not alive[rc].all():
                raise RuntimeError("datastore search returned an entry of another namespace or a deleted one (bug)")
        if hit is None:
            ids = ids_col[rows]
        else:
            ids = np.where(hit, ids_col[np.where(hit, rows, 0)], -1)
        return SearchResult(torch.from_numpy(S), torch.from_numpy(ids), torch.from_numpy(rows))

    def _fast_candidates(self, index: FaissIndex, q: np.ndarray, k: int, K: int, alive: np.ndarray, doc: np.ndarray,
                         excl: np.ndarray | None, filtered: bool, rescore: bool, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 with filtering (tombstones, excluded documents; more candidates while short),
        stage 2 (exact re-scoring where the index's distances are approximate), top-k."""
        Q = q.shape[0]
        while True:
            S, I = index.search(q, K)
            ok = I >= 0
            if filtered:
                Ic = np.where(ok, I, 0)
                ok &= alive[Ic]
                if excl is not None:
                    ok &= (doc[Ic] != excl[:, None]) | (excl[:, None] < 0)
            if K >= index.ntotal or not filtered or bool((ok.sum(1) >= k).all()):
                break
            K = min(2 * K, index.ntotal)   # tombstones / excluded docs ate the candidates: fetch more
        if rescore:
            kq = keys[np.where(ok, I, 0)].astype(np.float32)                       # (Q, K, d) exact re-scoring
            S = -((q[:, None, :] - kq) ** 2).sum(-1) if self.cfg.metric == "l2" else (q[:, None, :] * kq).sum(-1)
        S = np.where(ok, S, np.float32(-np.inf)).astype(np.float32)
        order = np.argsort(-S, axis=1, kind="stable")[:, :k]
        S, I = np.take_along_axis(S, order, 1), np.take_along_axis(I, order, 1)
        if S.shape[1] < k:
            S = np.concatenate([S, np.full((Q, k - S.shape[1]), -np.inf, np.float32)], 1)
            I = np.concatenate([I, np.full((Q, k - I.shape[1]), -1, np.int64)], 1)
        return np.ascontiguousarray(S), np.ascontiguousarray(np.where(S > -np.inf, I, -1))

    def _result(self, s: Tensor, rows: Tensor, codes: Tensor) -> SearchResult:
        rows = rows.masked_fill(s == float("-inf"), -1)
        rc = rows.clamp(min=0)
        ok = rows >= 0
        # the wall between namespaces, checked once more on what is about to be returned
        if bool((ok & (self._ns[rc] != codes[:, None])).any()) or bool((ok & ~self._alive[rc]).any()):
            raise RuntimeError("datastore search returned an entry of another namespace or a deleted one (bug)")
        return SearchResult(s, torch.where(ok, self._ids[rc], -1), rows)

    def _empty(self, Q: int, k: int) -> SearchResult:
        z = torch.full((Q, k), -1, dtype=torch.long, device=self.device)
        return SearchResult(torch.full((Q, k), float("-inf"), device=self.device), z, z.clone())

    # ------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the store to directory `path` (crash-safe; see the module docstring)."""
        from memstack.memory.retrieval.store_io import save_store

        return save_store(self, path)

    @classmethod
    def open(cls, path: str | Path, expect_fingerprint: str | None = None, device: str | torch.device = "cpu") -> "Datastore":
        """Load a store; refuses a corrupted or edited file, an unknown format, or (with
        `expect_fingerprint`) a store whose keys another model or embedder produced. What a crashed
        save left behind is removed first (when no other process is writing the store)."""
        from memstack.memory.retrieval.store_io import open_store

        return open_store(cls, path, expect_fingerprint, device)


def _bound(namespaces: list[str], next_id: int, rows: int) -> dict[str, str]:
    return {"namespaces": json.dumps(list(namespaces)), "next_id": str(next_id), "rows": str(rows)}

