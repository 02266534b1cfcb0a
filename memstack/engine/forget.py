"""Forgetting a memory namespace (a user, a task) in a serving engine, tier by tier, verifiably.

    out = engine.forget("tenant:acme/user:alice")     # between two steps (a server: the engine thread)

What the engine holds for a namespace, and how each goes:

- requests in flight that read it (their own namespace, or one they read with it): aborted --
  their K/V blocks and memory state rows go back;
- every memory's rows / entries of it: `Memory.forget` (per-namespace tables; the datastore
  entries of kNN-LM, RETRO, RAG, persisted: memory/retrieval/namespaces.py) -- the engine names
  no family, it asks each memory;
- memory sessions whose requests read it (their state and K/V carry what its rows gave): closed,
  a request running on one aborted first;
- cached prefix blocks made under it: every cached block records the namespaces of the sequence
  that made it (`BlockPool.cache(..., tag)`), so exactly those blocks lose their keys; every
  other user's cached blocks stay where they are, still found. The host and disk tiers drop
  (zero / delete) the blocks tagged with it as well.

The result says what was removed from each tier and what is left (`left`: every count must be
0 -- a server's forget reports it, tests check it).
"""
from __future__ import annotations

from memstack.memory.base import row_reads


def forget_namespace(engine, ns: str) -> dict:
    def reads(x) -> bool:
        return x is not None and ns in row_reads(x)

    aborted = [r.id for r in list(engine.requests.values()) if not r.finished and reads(r.namespace)]
    for rid in aborted:
        engine.abort(rid)
    memories = engine.serving.memory.memories
    tables = entries = 0
    for m in memories:
        n = m.forget(ns)
        if m.namespace_rows() is not None:
            tables += n
        else:
            entries += n
    ms = engine.memory_sessions
    closed = 0
    for (tenant, sid), s in list(ms.sessions.items()):
        if ns in s.namespaces:
            if s.busy:
                engine.abort(s.busy)
            ms.close(tenant, sid)
            closed += 1
    cached = engine.pool.uncache(reads)
    tiers = engine.tiers.drop(reads) if engine.tiers is not None else {}
    left = {"requests": sum(not r.finished and reads(r.namespace) for r in engine.requests.values()),
            "memory_entries": sum(m.holds(ns) for m in memories),
            "sessions": sum(ns in s.namespaces for s in ms.sessions.values()),
            "cached_blocks": sum(reads(b.tag) for b in engine.pool.cached.values())}
    if engine.tiers is not None:
        host, disk = engine.tiers.host, engine.tiers.disk
        left["tier_blocks"] = (sum(map(reads, host.tags.values())) if host is not None else 0) + (
            sum(map(reads, disk.tags.values())) if disk is not None else 0)
    return {"requests_aborted": len(aborted), "tables_dropped": tables, "datastore_entries_removed": entries,
            "sessions_closed": closed, "cached_blocks_dropped": cached, **tiers, "left": left}


__all__ = ["forget_namespace"]
