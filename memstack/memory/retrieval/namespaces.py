"""Forgetting a namespace in a served retrieval memory: the one mechanism for every memory that
keeps datastore entries per namespace (kNN-LM, RETRO, RAG).

A memory with a corpus datastore (`self.store`, opened from the directory `cfg.store`) mixes in
`ForgetsEntries`: `forget(ns)` removes the namespace's entries from the store in memory
(`Datastore.forget`: keys, payloads and texts overwritten, the namespace's index and name gone,
every other namespace untouched) and writes the store back to its directory the way every
datastore write goes (store_io.py: a new content-named tensor file, then the sealed manifest,
under the store's writer lock -- a crash leaves the previous version readable). A save that
fails is retried by the next `forget` (the memory remembers it has unsaved removals), so a
client's retried forget reaches the disk even though the entries are already gone in memory.

What it does not cover: another process writing the same store directory at the same time (the
last writer wins: forget re-writes the whole store) and the store's earlier tensor files the
filesystem may still hold blocks of (they are unlinked, not overwritten).
"""
from __future__ import annotations

from pathlib import Path


class ForgetsEntries:
    """Mixin for a `Memory` with `self.store` (a Datastore or None) opened from `self.cfg.store`."""

    _unsaved: bool = False

    def forget(self, namespace: str) -> int:
        store = getattr(self, "store", None)
        if store is None:
            return 0
        had = namespace in store.namespaces                 # (entries all deleted earlier: rows still there)
        n = store.forget(namespace)
        path = getattr(self.cfg, "store", None)
        if path is not None and (had or self._unsaved):
            self._unsaved = True
            store.save(Path(path))
            self._unsaved = False
        return n

    def holds(self, namespace: str) -> int:
        store = getattr(self, "store", None)
        return 0 if store is None else store.count(namespace)


def query_names(reads: list[tuple[str, ...]], repeat: int = 1) -> str | list:
    """`Datastore.search`'s namespace argument for rows reading `reads` (StepContext.reads_of),
    each row's query repeated `repeat` times: one name when every row reads the same single one,
    else one entry per query (a name, or the tuple whose union it searches)."""
    if len(set(reads)) == 1 and len(reads[0]) == 1:
        return reads[0][0]
    return [r[0] if len(r) == 1 else r for r in reads for _ in range(repeat)]


__all__ = ["ForgetsEntries", "query_names"]
