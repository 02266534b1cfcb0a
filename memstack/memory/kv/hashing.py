"""Deterministic, versioned prefix keys for paged KV blocks.

A full block of `block_size` tokens is identified by a hash chain (vLLM's automatic prefix
caching, docs/design/prefix_caching.md):

    h_0 = root(namespace, salt)
    h_i = sha256(h_{i-1} || tokens of block i || extra keys of block i)

so a block's key names its whole prefix, not only its own tokens. The root binds every key to
what makes KV reusable at all -- the model's weights and config (fingerprint), the tokenizer,
the KV dtype and representation (quantization), and the key format version -- and to a
per-tenant `salt`: two tenants never produce the same key, so they never share blocks (and
cannot probe each other's prompts by timing).

SHA-256 over a canonical byte encoding: keys are identical across processes, machines and
Python versions, and never depend on `PYTHONHASHSEED` (LMCache#1803 is the bug this avoids).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any, Sequence

KEY_VERSION = 1  # bump when the encoding below changes: old persisted keys then simply miss


@dataclass(frozen=True)
class CacheNamespace:
    """What KV depends on besides the tokens. Persisted KV is reused only under an equal one."""

    model_fingerprint: str          # model_fingerprint(model): config + weights
    tokenizer: str = ""             # tokenizer name + fingerprint ("" for raw token ids)
    dtype: str = "float32"          # KV element dtype
    quant: str = "none"             # KV representation (e.g. "kivi-k2v2-r32"); part of the key
    block_size: int = 16
    version: int = KEY_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatches(self, other: "CacheNamespace") -> list[str]:
        """Every field that differs (what a refusal of persisted KV lists)."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: stored {b[k]!r}, this engine {a[k]!r}" for k in a if a[k] != b[k]]

    def root(self, salt: str | None = None) -> bytes:
        """Root of the hash chain for one tenant (`salt` None: the shared, unsalted namespace)."""
        doc = {"ns": self.to_dict(), "salt": salt}
        return hashlib.sha256(b"memstack-kv\0" + json.dumps(doc, sort_keys=True).encode()).digest()


def block_hash(parent: bytes, tokens: Sequence[int], extra: Sequence[Any] = ()) -> bytes:
    """Key of one full block: sha256(parent || n || tokens as int64 LE || extra as canonical JSON)."""
    h = hashlib.sha256(parent)
    toks = [int(t) for t in tokens]
    h.update(struct.pack(f"<q{len(toks)}q", len(toks), *toks))
    if extra:
        h.update(json.dumps(list(extra), sort_keys=True, separators=(",", ":")).encode())
    return h.digest()


def chain_hashes(root: bytes, tokens: Sequence[int], block_size: int, extra: Sequence[Any] = (),
                 start: int = 0, parent: bytes | None = None) -> list[bytes]:
    """Keys of the full blocks of `tokens` from block `start` on (parent = key of block start-1)."""
    out, p = [], parent if parent is not None else root
    for i in range(start, len(tokens) // block_size):
        p = block_hash(p, tokens[i * block_size:(i + 1) * block_size], extra)
        out.append(p)
    return out


def model_fingerprint(model) -> str:
    """sha256 of a model's config (if it has one) and every parameter/buffer, in name order."""
    import torch

    from memstack.memory.state import unique_state_dict
    from memstack.config import to_dict

    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        h.update(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode())
    for name, t in sorted(unique_state_dict(model).items()):
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
