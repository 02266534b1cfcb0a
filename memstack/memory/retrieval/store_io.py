"""Saving and opening a `Datastore` (the persistence half of store.py; the format is described
in store.py's docstring): one content-named safetensors file with every column, the texts and the
FAISS indexes, and a sealed manifest naming it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from memstack.atomic import (StoreLock, clean_temporaries, read_sealed, remove_unreferenced, save_tensors_versioned,
                             sha256_file, tidy, versioned_name_re, write_sealed)
from memstack.config import from_dict, to_dict
from memstack.errors import IntegrityError
from memstack.memory.retrieval.backends import FaissIndex
from memstack.memory.retrieval.config import StoreConfig
from memstack.memory.retrieval.store import (_MANIFEST_FIELDS, FORGOTTEN, KIND, STORE_FORMAT, Datastore,
                                             DatastoreError, _bound)


def save_store(self: Datastore, path: str | Path) -> Path:
    """Write the store to directory `path` (crash-safe; see the module docstring)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = self._n
    t: dict[str, Tensor] = {
        "keys": self.keys.cpu(), "ids": self.ids.cpu(), "doc": self.doc.cpu(),
        "ns": self._ns[:n].cpu(), "alive": self.alive.cpu(),
    }
    for name in self.schema:
        t[f"payload.{name}"] = self.payload(name).cpu()
    if self.has_text:
        data = [s.encode("utf-8") for s in self._texts]
        t["text.offsets"] = torch.tensor(np.cumsum([0] + [len(d) for d in data]), dtype=torch.long)
        t["text.bytes"] = torch.frombuffer(bytearray(b"".join(data)) or bytearray(1), dtype=torch.uint8).clone()
    for code, index in self._index.items():
        blob = index.serialize()
        if blob is not None:
            t[f"index.{code}"] = torch.from_numpy(np.asarray(blob, dtype=np.uint8).copy())
    t = {k: v.contiguous() for k, v in t.items()}
    with StoreLock(path):
        clean_temporaries(path, legacy=True)
        # the namespace names and the id counter also go into the tensor file's header, which its
        # SHA-256 covers: a manifest re-sealed with other names or counter no longer matches it
        name, sha = save_tensors_versioned(t, path, "store", metadata=_bound(self.namespaces, self.next_id, n))
        write_sealed(path / "manifest.json", KIND, STORE_FORMAT, {
            "config": to_dict(self.cfg), "fingerprint": self.fingerprint, "namespaces": self.namespaces,
            "next_id": self.next_id, "rows": n, "tombstones": self._dead,
            "schema": {k: [d, list(s)] for k, (d, s) in self.schema.items()}, "text": self.has_text,
            "tensors": name, "sha256": sha})
        remove_unreferenced(path, "store", {name})
    return path


def open_store(cls: type[Datastore], path: str | Path, expect_fingerprint: str | None = None,
               device: str | torch.device = "cpu") -> Datastore:
    """Load a store; refuses a corrupted or edited file, an unknown format, or (with
    `expect_fingerprint`) a store whose keys another model or embedder produced. What a crashed
    save left behind is removed first (when no other process is writing the store)."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise DatastoreError(f"no datastore at {path} (manifest.json missing); build one with `memstack datastore build`",
                             "cannot open datastore")
    cleaned = tidy(path, lambda: {"store": read_sealed(mf, KIND, STORE_FORMAT, {"tensors": str})["tensors"]},
                   legacy=True)         # what an interrupted save left, when nobody is writing the store
    try:
        meta = read_sealed(mf, KIND, STORE_FORMAT, _MANIFEST_FIELDS,
                           older=f"run `memstack migrate {path}` to verify it and add the checksums")
    except IntegrityError as e:
        raise DatastoreError(str(e), f"cannot open datastore {path}") from None
    r = []
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        r.append(f"the keys were produced by {meta['fingerprint']!r}, not by {expect_fingerprint!r}: "
                 "a store from another model or embedder cannot be read (rebuild it with this one)")
    names = meta["namespaces"]
    if not all(isinstance(x, str) and x for x in names) or len(set(names)) != len(names):
        r.append(f"{mf}: namespaces must be distinct non-empty names, got {names!r}")
    if meta["rows"] < 0 or meta["next_id"] < 0 or not 0 <= meta["tombstones"] <= meta["rows"]:
        r.append(f"{mf}: rows {meta['rows']}, tombstones {meta['tombstones']}, next_id {meta['next_id']} are inconsistent")
    tf = path / meta["tensors"]
    if not r and (not versioned_name_re("store").fullmatch(meta["tensors"]) or not tf.is_file()):
        r.append(f"{mf} names {tf.name}, which is missing")
    if not r and sha256_file(tf) != meta["sha256"]:
        r.append(f"{tf} fails its SHA-256 check: the file is corrupted or was modified")
    if r:
        raise DatastoreError(r, f"cannot open datastore {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(tf), "pt") as fh:
            bound = fh.metadata() or {}
        if bound != _bound(names, meta["next_id"], meta["rows"]):
            raise DatastoreError(f"{mf} does not match the namespaces / next id / rows recorded in {tf.name} "
                                 "(the manifest was replaced)", f"cannot open datastore {path}")
        cfg = from_dict(StoreConfig, meta["config"], what="stored datastore config")
        t = load_file(str(tf))
        schema = {k: (d, tuple(s)) for k, (d, s) in meta["schema"].items()}
        store = cls(cfg, meta["fingerprint"], schema, meta["text"], "cpu")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DatastoreError(f"{path} is corrupted: {e}", "cannot open datastore") from None
    n = meta["rows"]
    cols = {"keys": (n, cfg.dim), "ids": (n,), "doc": (n,), "ns": (n,), "alive": (n,),
            **{f"payload.{k}": (n, *s) for k, (d, s) in schema.items()}}
    bad = [f"{k}: expected shape {v}, found {tuple(t[k].shape) if k in t else 'nothing'}" for k, v in cols.items()
           if k not in t or tuple(t[k].shape) != v]
    if not bad:
        bad = _column_problems(t, meta, n)
    if bad:
        raise DatastoreError(bad, f"cannot open datastore {path} (columns inconsistent with {mf.name})")
    store._grow(n)
    store._keys[:n], store._ids[:n], store._doc[:n] = t["keys"], t["ids"], t["doc"]
    store._ns[:n], store._alive[:n] = t["ns"], t["alive"]
    store._key_sq[:n] = (t["keys"].float() ** 2).sum(-1)
    for k in schema:
        store._payload[k][:n] = t[f"payload.{k}"]
    if store.has_text:
        off, data = t["text.offsets"].tolist(), t["text.bytes"].numpy().tobytes()
        store._texts = [data[off[i]:off[i + 1]].decode("utf-8") for i in range(n)]
    store._n, store._dead, store.next_id = n, meta["tombstones"], meta["next_id"]
    store.namespaces = list(names)
    store._ns_code = {s: i for i, s in enumerate(store.namespaces)}
    if cfg.backend != "exact":
        for code in range(len(store.namespaces)):
            key = f"index.{code}"
            if store.namespaces[code].startswith(FORGOTTEN):
                continue                                # a forgotten namespace: dead rows, no index
            try:
                if key in t:
                    store._index[code] = FaissIndex.deserialize(cfg, t[key].numpy())
                else:
                    store._rebuild_index(code)
            except RuntimeError as e:
                raise DatastoreError(f"{tf}: the index of namespace {store.namespaces[code]!r} is unreadable: {e}",
                                     "cannot open datastore") from None
    store.cleaned = cleaned
    return store.to(device)


def _column_problems(t: dict[str, Tensor], meta: dict, n: int) -> list[str]:
    """What in the columns contradicts the manifest (each would corrupt a later add or delete)."""
    r = []
    ids, ns, alive = t["ids"], t["ns"], t["alive"]
    if ids.dtype != torch.int64 or ns.dtype != torch.int64 or alive.dtype != torch.bool:
        return [f"column dtypes ids {ids.dtype}, ns {ns.dtype}, alive {alive.dtype} (expected int64, int64, bool)"]
    if n:
        if int(ids.min()) < 0 or bool((ids[1:] <= ids[:-1]).any()):
            r.append("ids must be non-negative and strictly increasing")
        if int(ids.max()) >= meta["next_id"]:
            r.append(f"next_id {meta['next_id']} is not above the largest stored id {int(ids.max())}: the next add "
                     "would reuse a live id")
        if int(ns.min()) < 0 or int(ns.max()) >= len(meta["namespaces"]):
            r.append(f"namespace codes outside the {len(meta['namespaces'])} names of the manifest")
    if int((~alive).sum()) != meta["tombstones"]:
        r.append(f"{int((~alive).sum())} deleted rows, but the manifest counts {meta['tombstones']}")
    if meta["text"]:
        off, data = t.get("text.offsets"), t.get("text.bytes")
        if off is None or data is None or tuple(off.shape) != (n + 1,) or int(off[0]) != 0 or \
                bool((off[1:] < off[:-1]).any()) or int(off[-1]) > data.numel():
            r.append("the text offsets do not fit the text bytes")
    return r
