"""Which past tokens a query may see: the model's context semantics, as the engine runs them.

memstack models process documents in segments of `seg_len` (their own context window); the
KV cache's config says what attention sees beyond it (memory/kv/config.py):

    segment   the current segment only (the plain backbone; `kv_dense` scope=segment)
    document  everything (`kv_dense`/`kv_paged` scope=document, no window)
    window    the current segment and the last `window` tokens before it (document + window)

The engine reproduces exactly that, so its output equals `memstack.generate` on the same model;
chunks never cross a segment boundary, because the visible range changes there. Memories other
than KV caches keep state the engine cannot page yet (XL memory, memory tokens, ...): such a
model is refused with the reasons (`memstack generate` then decodes it with the plain decoder).
"""
from __future__ import annotations

from dataclasses import dataclass

KV_ONLY = ("none", "kv_dense", "kv_paged")


@dataclass(frozen=True)
class ContextPolicy:
    seg_len: int
    scope: str = "segment"          # "segment" | "document"
    window: int | None = None       # document scope: tokens before the segment kept

    def visible_start(self, tok: int) -> int:
        """First token visible to a query at token index `tok`."""
        seg_start = tok - tok % self.seg_len
        if self.scope == "segment":
            return seg_start
        return 0 if self.window is None else max(0, seg_start - self.window)

    @property
    def unbounded(self) -> bool:
        return self.scope == "document" and self.window is None

    def max_visible(self) -> int | None:
        """Most tokens a query can see (None: unbounded)."""
        if self.scope == "segment":
            return self.seg_len
        return None if self.window is None else self.window + self.seg_len


def context_policy(model) -> tuple[ContextPolicy | None, list[str]]:
    """The policy of a model, or (None, reasons) when the engine cannot serve it."""
    seg = model.cfg.backbone.seg_len
    reasons, policy = [], ContextPolicy(seg)
    for m in model.cfg.memories:
        if m.kind not in KV_ONLY:
            reasons.append(f"memory {m.kind!r} keeps state the engine does not page (it serves "
                           f"{', '.join(KV_ONLY)} only)")
        elif m.kind in ("kv_dense", "kv_paged"):
            policy = ContextPolicy(seg, getattr(m, "scope", "document"), getattr(m, "window", None))
            if getattr(m, "compression", None) is not None and m.compression.policy != "none":
                reasons.append(f"{m.kind}: in-model compression ({m.compression.policy}) is evaluated through the "
                               "memory interface; give the engine a per-request compression instead")
    return (None if reasons else policy), reasons
