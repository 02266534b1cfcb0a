"""Which past slots a query may see: the model's context semantics, as the engine runs them.

memstack models process documents in segments of `seg_len` (their own context window). A memory
whose config declares itself a KV cache (`MemoryConfig.kv_cache`) says what attention sees
beyond the segment; the engine drops that memory from the model it runs and gives its paged pool
the same semantics, in *slots* (every token the cache would store, memory tokens included):

    segment   the current segment only (no KV-cache memory: what `memstack.generate` decodes with)
    document  everything
    window    the current segment and the last `window` slots before it

Every other memory runs inside the model's forward with its state in the engine's per-request
slots. A chunk never crosses a segment boundary (the visible range and the memories' phases change
there). Refused, with the reasons: two KV caches, a KV cache that compresses inside the model
(give the engine a per-request compression instead), an EMBED memory that does not declare how
many tokens it adds (`Memory.embed_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ContextPolicy:
    seg_len: int
    scope: str = "segment"          # "segment" | "document"
    window: int | None = None       # document scope: slots before the segment kept

    def visible_start(self, tok: int) -> int:
        """First token visible to a query at token index `tok` (models whose slots are tokens)."""
        seg_start = tok - tok % self.seg_len
        if self.scope == "segment":
            return seg_start
        return 0 if self.window is None else max(0, seg_start - self.window)

    def visible_slot(self, seg_slot0: int) -> int:
        """First visible slot, given the slot where the current segment's first token went."""
        if self.scope == "segment":
            return seg_slot0
        return 0 if self.window is None else max(0, seg_slot0 - self.window)

    @property
    def unbounded(self) -> bool:
        return self.scope == "document" and self.window is None

    def max_visible(self) -> int | None:
        """Most tokens a query can see (None: unbounded)."""
        if self.scope == "segment":
            return self.seg_len
        return None if self.window is None else self.window + self.seg_len


def kv_cache_memories(model) -> list[int]:
    """Positions in the stack of the memories that declare themselves KV caches."""
    return [i for i, m in enumerate(model.cfg.memories) if m.kv_cache is not None]


def context_policy(model) -> tuple[ContextPolicy | None, list[str]]:
    """The policy of a model, or (None, reasons) when the engine cannot serve it."""
    seg = model.cfg.backbone.seg_len
    reasons, policy = [], ContextPolicy(seg)
    caches = kv_cache_memories(model)
    if len(caches) > 1:
        reasons.append(f"memories {[model.cfg.memories[i].kind for i in caches]} are all KV caches; keep one")
    for i in caches:
        m = model.cfg.memories[i]
        sem = m.kv_cache
        policy = ContextPolicy(seg, sem.scope, sem.window)
        if not sem.plain:
            reasons.append(f"{m.kind}: its cache compresses inside the model (evaluated through the memory interface); "
                           "give the engine a per-request compression instead")
    undeclared = model.memory.undeclared_embed()
    if undeclared:
        reasons.append(f"memories {undeclared} add tokens to the input without declaring how many "
                       "(Memory.embed_tokens): the engine cannot reserve their K/V slots")
    return (None if reasons else policy), reasons
