"""Identity addressing: one row per key (user / task / tenant ids), collision-free.

Monolith's collisionless embedding table (arXiv 2209.07663) in miniature: a key is *admitted*
(given its own row) only after it has been seen `admit_after` times (frequency filtering), and
a row whose key has not been accessed for `ttl` ticks expires and returns to the free list
(expirable embeddings). A tick is whatever clock the caller advances (training steps, online
update versions, seconds). When the namespace is full and nothing has expired, new keys are
not admitted (they read as a miss, a zero row) -- an existing key is never silently evicted.

The index is plain data (key -> slot, counts, last access), saved and restored with
`state_dict()` / `from_state_dict()` beside the table's snapshots.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class IdentityIndex:
    rows: int                         # slots in the namespace
    admit_after: int = 1              # sightings before a key gets a row
    ttl: int | None = None            # ticks without access before a row expires; None = never
    slot_of: dict[int, int] = field(default_factory=dict)       # admitted key -> slot
    key_of: dict[int, int] = field(default_factory=dict)        # slot -> key
    last_access: dict[int, int] = field(default_factory=dict)   # slot -> tick of last access
    seen: dict[int, int] = field(default_factory=dict)          # not yet admitted key -> sightings
    refused: int = 0                  # admissions refused because the namespace was full

    def __post_init__(self) -> None:
        r = []
        if self.rows < 1:
            r.append(f"rows must be >= 1, got {self.rows}")
        if self.admit_after < 1:
            r.append(f"admit_after must be >= 1, got {self.admit_after}")
        if self.ttl is not None and self.ttl < 1:
            r.append(f"ttl must be >= 1 or None, got {self.ttl}")
        if r:
            raise ValueError("; ".join(r))

    def _free_slot(self, now: int) -> int | None:
        if len(self.slot_of) < self.rows:
            used = set(self.key_of)
            return next(s for s in range(self.rows) if s not in used)
        self.expire(now)
        if len(self.slot_of) < self.rows:
            return self._free_slot(now)
        return None

    def expire(self, now: int) -> list[int]:
        """Free the slots whose key was last accessed more than `ttl` ticks ago; returns them."""
        if self.ttl is None:
            return []
        gone = [s for s, t in self.last_access.items() if now - t > self.ttl]
        for s in gone:
            key = self.key_of.pop(s)
            del self.slot_of[key]
            del self.last_access[s]
        return sorted(gone)

    def lookup(self, keys: Tensor | list[int], now: int = 0, admit: bool = True) -> Tensor:
        """Slots (int64, same shape as keys) for keys; -1 where a key has no row (yet).
        With `admit`, each call counts as one sighting per distinct key and admits keys that
        reach `admit_after`; access refreshes the TTL clock of admitted keys."""
        kt = torch.as_tensor(keys, dtype=torch.int64)
        flat = kt.reshape(-1).tolist()
        out = []
        counted: set[int] = set()
        for k in flat:
            s = self.slot_of.get(k)
            if s is None and admit and k not in counted:
                counted.add(k)
                self.seen[k] = self.seen.get(k, 0) + 1
                if self.seen[k] >= self.admit_after:
                    s = self._free_slot(now)
                    if s is None:
                        self.refused += 1
                    else:
                        del self.seen[k]
                        self.slot_of[k], self.key_of[s] = s, k
            if s is not None:
                self.last_access[s] = now
            out.append(-1 if s is None else s)
        return torch.tensor(out, dtype=torch.int64).reshape(kt.shape)

    def forget(self, key: int) -> int | None:
        """Remove a key (e.g. a deletion request); returns its freed slot, whose row the caller
        should clear."""
        s = self.slot_of.pop(int(key), None)
        self.seen.pop(int(key), None)
        if s is not None:
            del self.key_of[s]
            self.last_access.pop(s, None)
        return s

    def state_dict(self) -> dict:
        return {"rows": self.rows, "admit_after": self.admit_after, "ttl": self.ttl, "refused": self.refused,
                "slots": sorted([k, s, self.last_access.get(s, 0)] for k, s in self.slot_of.items()),
                "seen": sorted([k, c] for k, c in self.seen.items())}

    @classmethod
    def from_state_dict(cls, d: dict) -> "IdentityIndex":
        idx = cls(d["rows"], d["admit_after"], d["ttl"], refused=d.get("refused", 0))
        for k, s, t in d["slots"]:
            idx.slot_of[k], idx.key_of[s], idx.last_access[s] = s, k, t
        idx.seen = {k: c for k, c in d["seen"]}
        return idx
