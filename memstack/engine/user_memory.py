"""Learning while serving: per-namespace (user / task) memory rows, learned online, versioned, forgettable.

    mem = UserMemory(model, root, LearnConfig(), canary=[ids, ...])
    out = mem.learn("tenant:acme/user:alice", [ids, ...], install)   # an online update of alice's rows
    mem.log(ns); mem.rollback(ns, v, install); mem.export(ns); mem.import_(ns, data, install); mem.forget(ns, drop)

The model's memories that read per-namespace rows (`Memory.namespace_rows()`; the engine names no
family) hold the tables; this service writes them. One `learn`:

1. checks the request (every reason at once: empty or too long texts, too many, ids out of the
   vocabulary) and the namespace's rate limit (learn calls per minute);
2. copies the namespace's current table and runs `steps` online sparse updates on the copy
   (memory/sparse/online.py: frozen backbone and knowledge rows; the rows the texts touch in that
   namespace only, through its `WriteGrant`; the safety policy -- NaN/Inf, per-row update norm
   cap, the namespace's write quota per version -- refuses an update whole, with every reason,
   and then nothing is committed or installed). The forward reads the copy through
   `NamespaceRows.staged`, visible to the learning thread only: requests being served meanwhile
   keep reading the installed version. The shortcut: the backbone is frozen and a namespace's rows
   are read only from `MemoryModel.namespace_layer()` on (each memory declares its
   `Memory.namespace_layer`), so the blocks below it run once per learn, without grad
   (`run_until`), and every update runs only the blocks from there on, forward and backward
   (`resume`) -- the same loss and gradient (tests/backbone/test_resume.py);
3. commits the copy's touched rows as a new version of the namespace's own `TableStore`
   (sealed, checksummed, crash-safe: a crash leaves the last committed version);
4. the drift guard: the mean next-token loss on a fixed canary set, read as that namespace,
   before and after; a relative rise above `drift_threshold` rolls the store back to the previous
   version and installs nothing (reported, and kept in the log). The canary's lower blocks are
   computed once per model (they are every user's), and "before" -- the loss at the installed
   table, the last committed version -- is cached per table object: a learn that installs its
   table records its "after" as the next "before"; a rollback, import, restore or forget replaces
   or drops the table, and its loss is then computed afresh;
5. hands the copy to `install(ns, table)` -- the server runs it in the engine thread between two
   steps -- so that namespace's next request reads it, without a restart.

Nothing here takes a namespace from a client: the server derives it from the authenticated tenant
and one of the tenant's declared users.
"""
from __future__ import annotations

import base64
import contextlib
import math
import shutil
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.config import Checked
from memstack.errors import ConfigError, MemstackError
from memstack.memory.base import Step
from memstack.memory.sparse.grants import NamespaceAuthority
from memstack.memory.sparse.online import OnlineUpdater, UpdatePolicy
from memstack.memory.sparse.store import TableStore

Install = Callable[[str, object], None]       # (namespace, SparseTable | None) -> runs between engine steps


class MemoryRefused(MemstackError, ValueError):
    """A learn / rollback / import that was refused whole; `reasons` lists every reason."""

    def __init__(self, reasons: list[str] | str, status: int = 400):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        self.status = status
        super().__init__("; ".join(self.reasons))


def _pos(x: object, integer: bool = False) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (integer and not isinstance(x, int)):
        return False
    return math.isfinite(x) and x > 0


@dataclass(frozen=True)
class LearnConfig(Checked):
    """How a server learns per-user rows online.

    lr, steps:           row optimizer (lazy Adam) learning rate, and updates per learn call
    max_row_update_norm: the safety policy's cap on each row's change per update (None: no cap)
    rate_per_min:        learn calls one namespace may make per 60 s
    max_texts, max_tokens: most texts per call, most tokens per text
    drift_threshold:     relative rise of the canary loss that rolls an update back (0.01 = 1 %)
    """

    lr: float = 0.05
    steps: int = 8
    max_row_update_norm: float | None = 1.0
    rate_per_min: int = 60
    max_texts: int = 32
    max_tokens: int = 256
    drift_threshold: float = 0.01

    def check(self) -> list[str]:
        r = []
        if not _pos(self.lr):
            r.append(f"lr must be a finite number > 0, got {self.lr!r}")
        for f in ("steps", "rate_per_min", "max_texts", "max_tokens"):
            if not _pos(getattr(self, f), integer=True):
                r.append(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.max_row_update_norm is not None and not _pos(self.max_row_update_norm):
            r.append(f"max_row_update_norm must be a finite number > 0 or None, got {self.max_row_update_norm!r}")
        if not _pos(self.drift_threshold):
            r.append(f"drift_threshold must be a finite number > 0, got {self.drift_threshold!r}")
        return r


def batch_of(texts: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """(tokens, targets) (B, T) for next-token training on each text; padding has target -100."""
    T = max(len(t) for t in texts) - 1
    x = torch.full((len(texts), T), pad, dtype=torch.long)
    y = torch.full((len(texts), T), -100, dtype=torch.long)
    for i, t in enumerate(texts):
        n = len(t) - 1
        x[i, :n] = torch.tensor(t[:-1])
        y[i, :n] = torch.tensor(t[1:])
    return x, y


class _Phases:
    """Wall seconds per phase of a learn: each call closes the phase since the previous one."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.spent[name] = self.spent.get(name, 0.0) + now - self.t
        self.t = now


class UserMemory:
    def __init__(self, model: torch.nn.Module, root: str | Path, cfg: LearnConfig = LearnConfig(),
                 canary: list[list[int]] | None = None, authority: NamespaceAuthority | None = None,
                 clock: Callable[[], float] = time.monotonic, shortcut: bool = True):
        """`shortcut=False`: the plain reference path -- the whole forward for every update and
        both canary passes every learn (what the shortcut is tested and benchmarked against)."""
        holders = [m for m in model.memory.memories if m.namespace_rows() is not None]
        reasons = []
        if len(holders) != 1:
            reasons.append(f"learning while serving needs exactly one memory with per-namespace rows (e.g. "
                           f"engram with user_rows_per_head > 0); this model has {len(holders)}")
        if canary is not None and (not canary or any(len(c) < 2 for c in canary)):
            reasons.append("the canary set must hold at least one text of >= 2 tokens")
        if reasons:
            raise ConfigError(reasons, what="user memory")
        self.model, self.cfg, self.root = model, cfg, Path(root)
        self.holder = holders[0]
        self.rows = self.holder.namespace_rows()
        self.vocab = model.cfg.backbone.vocab_size
        self.canary = canary
        # the first block that reads a namespace (Memory.namespace_layer): every block below it
        # computes the same for every user, so a learn runs them once (no grad) and each update
        # only the blocks from there on; 0 ("anywhere"): the whole forward every time
        self.layer = model.namespace_layer() if shortcut else 0
        self.shortcut = shortcut
        self._canary_batch = batch_of(canary) if canary is not None else None
        self._canary_start = None                    # the canary below `layer`: once per model
        # canary loss read as a namespace with the table installed now (the last committed and
        # installed version), per table object: a table replaced by install / rollback / import /
        # forget is a miss (recomputed), and a table dropped takes its entry with it
        self._canary_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._canary_empty: float | None = None      # read as a namespace without rows (user-independent)
        self.authority = authority or NamespaceAuthority()
        self.clock = clock
        # the backbone and the shared rows are frozen for good, before anything is served: the
        # online updater would otherwise flip requires_grad while requests run, and the engine's
        # forward takes (numerically) different paths for the two settings
        for p in model.parameters():
            p.requires_grad_(False)
        self.lock = threading.Lock()                 # one learner at a time (updates, commits, forgets)
        self.calls: dict[str, deque] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        if self._canary_batch is not None and shortcut:   # now (frozen), not in a user's first learn
            self._canary_start = self._start(self._canary_batch[0])
            # a fresh table reads as nothing, the same for every namespace: every new user's "before"
            self._canary_empty = self.canary_loss("user:_canary", self.rows.new_table("user:_canary"))

    # -- stores --------------------------------------------------------------------------------
    def _dir(self, ns: str) -> Path:
        return self.root / urllib.parse.quote(ns, safe="")

    def store(self, ns: str) -> TableStore:
        return TableStore(self._dir(ns))

    def restore(self, install: Install) -> list[str]:
        """Install every namespace's committed HEAD (a restarted server reads what it learned)."""
        done = []
        for d in sorted(self.root.iterdir()):
            if (d / "HEAD").is_file():
                ns = urllib.parse.unquote(d.name)
                install(ns, self._table(ns, TableStore(d).load()))
                done.append(ns)
        return done

    def _table(self, ns: str, weight: Tensor):
        t = self.rows.new_table(ns)
        with torch.no_grad():
            t.weight.copy_(weight)
        return t

    # -- learning ------------------------------------------------------------------------------
    def check_texts(self, texts: list[list[int]]) -> list[str]:
        r = []
        if not texts:
            r.append("give at least one text to learn")
        if len(texts) > self.cfg.max_texts:
            r.append(f"at most {self.cfg.max_texts} texts per call, got {len(texts)}")
        for i, t in enumerate(texts):
            if len(t) < 2:
                r.append(f"text {i}: needs at least 2 tokens, got {len(t)}")
            if len(t) > self.cfg.max_tokens:
                r.append(f"text {i}: {len(t)} tokens exceeds max_tokens {self.cfg.max_tokens}")
            bad = [x for x in t if not (isinstance(x, int) and 0 <= x < self.vocab)]
            if bad:
                r.append(f"text {i}: token ids must be in [0, {self.vocab}), got {bad[:5]}")
        return r

    def _rate(self, ns: str) -> list[str]:
        now = self.clock()
        q = self.calls.setdefault(ns, deque())
        while q and now - q[0] >= 60.0:
            q.popleft()
        if len(q) >= self.cfg.rate_per_min:
            return [f"rate limit: {self.cfg.rate_per_min} learn calls per minute for this user; retry in "
                    f"{60.0 - (now - q[0]):.1f} s"]
        q.append(now)
        return []

    def _start(self, x: Tensor):
        """The forward of batch x stopped below `layer` (no grad; None when there is no shortcut)."""
        if self.layer < 1:
            return None
        with torch.no_grad():
            return self.model.run_until(x, self.layer)

    @torch.no_grad()
    def canary_loss(self, ns: str, table=None) -> float:
        """Mean next-token loss on the canary set, read as namespace `ns` (with `table` staged)."""
        if self.canary is None:
            return math.nan
        x, y = self._canary_batch
        ctx = self.rows.staged(ns, table) if table is not None else contextlib.nullcontext()
        if self._canary_start is None or self._canary_start.layer != self.layer:
            self._canary_start = self._start(x)     # the canary's lower blocks: the same for every user
        names = (ns,) * x.shape[0]
        with ctx:
            if self._canary_start is not None:
                out, _ = self.model.resume(self._canary_start, namespaces=names)
            else:
                out, _ = self.model(x, None, Step(), namespaces=names)
        lg = out.logits
        return float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), y.reshape(-1), ignore_index=-100))

    def _canary_before(self, ns: str, before) -> float:
        """The canary loss at `ns`'s installed table (cached per table object; see __init__)."""
        if self.canary is None:
            return math.nan
        if not self.shortcut:
            return self.canary_loss(ns, before if before is not None else self.rows.new_table(ns))
        if before is None:
            if self._canary_empty is None:
                self._canary_empty = self.canary_loss(ns, self.rows.new_table(ns))
            return self._canary_empty
        got = self._canary_at.get(before)
        if got is None:
            got = self._canary_at[before] = self.canary_loss(ns, before)
        return got

    def learn(self, ns: str, texts: list[list[int]], install: Install, meta: dict | None = None) -> dict:
        """One online update of `ns`'s rows from `texts` (see the module docstring); MemoryRefused
        (nothing changed) when the input, the rate limit or the safety policy says no."""
        t0 = time.perf_counter()
        reasons = self.check_texts(texts)
        with self.lock:
            if not reasons:
                reasons += self._rate(ns)
            if reasons:
                raise MemoryRefused(reasons, status=429 if any(r.startswith("rate limit") for r in reasons) else 400)
            cand = self.rows.copy_of(ns)
            before = self.rows.table(ns)
            policy = UpdatePolicy(max_row_update_norm=self.cfg.max_row_update_norm)
            up = OnlineUpdater(self.model, cand, lr=self.cfg.lr, policy=policy, authority=self.authority)
            grant = self.authority.grant(ns)
            x, y = batch_of(texts)
            clock = _Phases()
            start = self._start(x)                   # the blocks below `layer`: once per learn
            clock("lower_blocks")
            losses, rows = [], 0
            with self.rows.staged(ns, cand):
                for _ in range(self.cfg.steps):
                    res = up.step(x, y, into=[grant], namespace=ns, start=start)
                    if not res.accepted:
                        raise MemoryRefused([f"update refused by the safety policy: {r}" for r in res.reasons])
                    losses.append(res.loss)
                    rows = max(rows, sum(len(s) for s in up.pending.values()))
            clock("updates")
            c0 = self._canary_before(ns, before)
            c1 = self.canary_loss(ns, cand)
            clock("canary")
            store = self.store(ns)
            if not store.exists:
                self._create(ns, store)
            prev = store.head
            up.store = store
            version = up.commit({"texts": len(texts), "steps": self.cfg.steps, "loss_first": losses[0],
                                 "loss_last": losses[-1], "canary_before": c0, "canary_after": c1, **(meta or {})})
            drift = (c1 - c0) / abs(c0) if self.canary is not None and c0 else 0.0
            rolled = bool(self.canary is not None and drift > self.cfg.drift_threshold)
            clock("commit")
            if rolled:
                store.rollback(prev)               # the drift guard: the user's rows go back
            else:
                install(ns, cand)
                if self.canary is not None and self.shortcut:
                    self._canary_at[cand] = c1       # the next learn's "before", unless replaced
            clock("install")
        return {"namespace": ns, "version": version, "head": store.head, "rows_written": rows,
                "loss_first": losses[0], "loss_last": losses[-1], "canary_before": c0, "canary_after": c1,
                "drift": drift, "rolled_back": rolled, "latency_s": time.perf_counter() - t0, "phases_s": clock.spent}

    def _create(self, ns: str, store: TableStore) -> None:
        """Version 1: the empty (all-zero) table. The layout, not the user, is recorded, so a user's
        delta can move to another server (or another user of the same model) by export / import."""
        store.create(self.rows.new_table(ns).weight.detach(), [{"name": "user-rows", "rows": self.rows.rows,
                     "dim": self.rows.dim, "layout": self._layout()}], meta={"created": "empty"})

    def _layout(self) -> str:
        fp = getattr(self.holder, "user_layout_fingerprint", None)
        return fp() if callable(fp) else ""

    # -- versions ------------------------------------------------------------------------------
    def _existing(self, ns: str) -> TableStore:
        s = self.store(ns)
        if not s.exists:
            raise MemoryRefused("this user has learned nothing yet (no memory versions)", status=404)
        return s

    def log(self, ns: str) -> dict:
        s = self.store(ns)
        if not s.exists:
            return {"head": None, "versions": []}
        head = s.head
        return {"head": head, "versions": [{"version": v.version, "parent": v.parent, "rows": v.touched,
                                            "created": v.created, "meta": v.meta, "head": v.version == head}
                                           for v in s.versions()]}

    def rollback(self, ns: str, version: int, install: Install) -> dict:
        with self.lock:
            s = self._existing(ns)
            if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= s.last:
                raise MemoryRefused(f"version must be one of 1..{s.last}, got {version!r}")
            s.rollback(version)
            install(ns, self._table(ns, s.load()))
            return {"namespace": ns, "head": s.head}

    def export(self, ns: str) -> dict:
        """The user's delta from the empty table (version 1) to HEAD, as a checksummed file (base64)."""
        with self.lock:
            s = self._existing(ns)
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "delta.safetensors"
                head = s.export_delta(1, s.head, p)
                data = base64.b64encode(p.read_bytes()).decode()
        return {"namespace": ns, "from_version": 1, "to_version": head["to_version"], "rows": head["n_rows"],
                "data": data}

    def import_(self, ns: str, data: str, install: Install) -> dict:
        """Apply an exported delta onto this user's empty table (refused unless HEAD is its base)."""
        try:
            raw = base64.b64decode(data, validate=True)
        except (ValueError, TypeError):
            raise MemoryRefused("data is not valid base64") from None
        with self.lock:
            s = self.store(ns)
            if not s.exists:
                self._create(ns, s)
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "delta.safetensors"
                p.write_bytes(raw)
                try:
                    v = s.import_delta(p, {"imported_by": "api"})
                except MemstackError as e:
                    raise MemoryRefused(str(e)) from None
            install(ns, self._table(ns, s.load()))
            return {"namespace": ns, "version": v, "head": s.head}

    def forget(self, ns: str, drop: Callable[[str], dict]) -> dict:
        """Remove every trace of `ns`: its store (every version, on disk) and, through `drop` (run in
        the engine thread), its rows in the model and its sessions / KV. Returns what was removed
        and that the store directory is gone."""
        with self.lock:
            d = self._dir(ns)
            versions = self.store(ns).last if self.store(ns).exists else 0
            removed = drop(ns)
            if d.exists():
                shutil.rmtree(d)
            self.calls.pop(ns, None)
            left = {**removed.pop("left", {}), "stored_versions": self.store(ns).last if self.store(ns).exists else 0}
            return {"namespace": ns, "versions_removed": versions, "store_exists": d.exists(), **removed, "left": left}


__all__ = ["LearnConfig", "MemoryRefused", "UserMemory", "batch_of"]
