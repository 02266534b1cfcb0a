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
  (zero / delete) the blocks tagged with it as well;
- the K/V bytes: every device block that held its K/V (aborted requests', closed sessions', the
  uncached ones) and is now free is zeroed, so nothing of it waits in the pool to be overwritten.

The result says what was removed from each tier and what is left (`left`: every count must be
0 -- a server's forget reports it, tests check it).
"""
from __future__ import annotations

import torch

from memstack.memory.base import row_reads


def forget_namespace(engine, ns: str) -> dict:
    def reads(x) -> bool:
        return x is not None and ns in row_reads(x)

    held: set[int] = set()                       # blocks that held its K/V: zeroed once free
    aborted = [r for r in list(engine.requests.values()) if not r.finished and reads(r.namespace)]
    for r in aborted:
        held.update(r.seq.block_ids if r.seq is not None else ())
        engine.abort(r.id)
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
            held.update(s.seq.block_ids if s.seq is not None else ())
            ms.close(tenant, sid)
            closed += 1
    dropped = engine.pool.uncache(reads)
    held.update(b.id for b in dropped)
    free = sorted(i for i in held if engine.pool.blocks[i].ref_cnt == 0)
    if free:                                    # its K/V bytes do not wait in free blocks to be overwritten
        engine.cache.write_blocks(free, torch.zeros(len(free), *engine.spec.block_shape))
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
            "sessions_closed": closed, "cached_blocks_dropped": len(dropped), "kv_blocks_zeroed": len(free), **tiers,
            "left": left}


__all__ = ["forget_namespace"]
