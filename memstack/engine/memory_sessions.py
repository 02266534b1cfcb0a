"""Memory sessions: a conversation's memory state and K/V kept between requests, per tenant.

    ms = engine.memory_sessions
    ms.create("tenant-a", "chat-42")
    engine.add_request(prompt_ids, params, session=("tenant-a", "chat-42"))   # continues the document
    ms.offload("tenant-a", "chat-42")                  # idle: its K/V leaves the device pool for host memory
    ms.export("tenant-a", "chat-42", "chat.session")   # state + K/V + tokens + namespace, checksummed
    other.memory_sessions.import_("chat.session", "tenant-a")                 # e.g. after a restart

A session is one document that grows by requests: each request's prompt is appended to what the
session holds (earlier prompts and outputs) and decoding continues from the memory state and the
K/V the previous request left -- for a recurrent memory (RMT, ARMT, Infini, ...) that state *is*
the conversation's long-term memory, and here it survives between requests, an offload to host
memory, and (export / import) a restart. The next tokens equal decoding the whole document at once
(tests/engine/test_memory_sessions.py, across a real process restart).

How: the session holds references on its blocks (the pool's reference counts); a request works on
a fork of them (copy-on-write of a shared tail) and on the session's state object (states are
functional: a forward returns new ones). When the request finishes normally the session adopts
the fork and the new state; when it fails, is aborted or preempted, the session is untouched (a
preempted request re-forks from it). One request at a time per session.

Namespaces: a session lives under (tenant, id); a tenant only ever finds its own sessions
("no session ... in namespace ..." whether the id is unknown or another tenant's). Export files
record the tenant, the model fingerprint, tokenizer, dtype and block size (the engine's
`CacheNamespace`); import refuses a file of another tenant or namespace (every mismatch listed),
a file whose tensors or whose manifest fails its SHA-256, and never trusts its structure beyond
the state classes of this model's memories.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memstack.errors import CheckpointError, MemstackError
from memstack.memory.base import row_reads
from memstack.memory.kv.hashing import CacheNamespace
from memstack.memory.kv.manager import SeqKV
from memstack.memory.state import ModelState

KIND = "memstack-memory-session"
FORMAT = 1


class SessionError(MemstackError, ValueError):
    """A session that cannot be used (unknown, busy, of another tenant or model); lists every reason."""

    def __init__(self, reasons: list[str] | str):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        super().__init__("session refused (" + str(len(self.reasons)) + " reason(s)):\n" +
                         "\n".join(f"  - {r}" for r in self.reasons))


@dataclass(eq=False)
class MemorySession:
    tenant: str
    id: str
    tokens: list[int] = field(default_factory=list)     # the document so far (prompts and outputs)
    seq: SeqKV | None = None                            # its K/V blocks in the device pool (None: empty / on host)
    state: ModelState | None = None                     # memory state after seq.n_tokens tokens (None: fresh)
    seg_slot0: int = 0                                  # absolute slot where its current segment began
    host_kv: Tensor | None = None                       # its blocks in host memory while offloaded
    host_seq: dict | None = None                        # the SeqKV fields while offloaded
    busy: str | None = None                             # the request running on it
    namespaces: set = field(default_factory=set)        # memory namespaces its requests read (forget closes it)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def n_computed(self) -> int:
        if self.seq is not None:
            return self.seq.n_tokens
        return self.host_seq["n_tokens"] if self.host_seq else 0

    @property
    def where(self) -> str:
        return "host" if self.host_kv is not None else "device"


def _check_name(what: str, x: Any) -> list[str]:
    return [] if isinstance(x, str) and x and len(x) <= 256 else [f"{what} must be a non-empty string of at most 256 "
                                                                    f"characters, got {x!r}"]


class MemorySessions:
    def __init__(self, engine):
        self.engine = engine
        self.sessions: dict[tuple[str, str], MemorySession] = {}

    # -- lookup --------------------------------------------------------------------------------
    def get(self, tenant: str, sid: str) -> MemorySession:
        r = _check_name("tenant", tenant) + _check_name("session id", sid)
        if r:
            raise SessionError(r)
        s = self.sessions.get((tenant, sid))
        if s is None:   # unknown and another tenant's look the same: nothing leaks across tenants
            raise SessionError(f"no session {sid!r} in namespace {tenant!r} (create it first)")
        return s

    def create(self, tenant: str, sid: str) -> MemorySession:
        r = _check_name("tenant", tenant) + _check_name("session id", sid)
        if not r and (tenant, sid) in self.sessions:
            r.append(f"session {sid!r} already exists in namespace {tenant!r}")
        if r:
            raise SessionError(r)
        s = MemorySession(tenant, sid)
        self.sessions[(tenant, sid)] = s
        return s

    def close(self, tenant: str, sid: str) -> None:
        """Forget a session and free its blocks (refused while a request runs on it)."""
        s = self.get(tenant, sid)
        if s.busy:
            raise SessionError(f"session {sid!r} is in use by request {s.busy!r}; abort it first")
        if s.seq is not None:
            self.engine.manager.free(s.seq)
        del self.sessions[(tenant, sid)]

    def list(self, tenant: str) -> list[dict]:
        return [self.info(t, i) for (t, i) in self.sessions if t == tenant]

    def info(self, tenant: str, sid: str) -> dict:
        s = self.get(tenant, sid)
        return {"tenant": s.tenant, "id": s.id, "tokens": len(s.tokens), "computed": s.n_computed, "where": s.where,
                "blocks": len(s.seq.blocks) if s.seq is not None else (0 if s.host_kv is None else s.host_kv.shape[0]),
                "busy": s.busy}

    def check_request(self, key: Any, request_id: str) -> tuple[MemorySession | None, list[str]]:
        """The session a new request names, or the reasons it cannot run on it."""
        if not (isinstance(key, tuple) and len(key) == 2):
            return None, [f"session must be a (tenant, session id) pair, got {key!r}"]
        try:
            s = self.get(*key)
        except SessionError as e:
            return None, e.reasons
        if s.busy:
            return None, [f"session {s.id!r} is in use by request {s.busy!r} (one request at a time per session)"]
        return s, []

    # -- requests on a session -----------------------------------------------------------------
    def start(self, req) -> None:
        """Give a request (about to be scheduled) its session's K/V (a fork) and state."""
        eng, s = self.engine, req.session
        s.last_used = time.monotonic()
        self._to_device(s)
        if s.seq is None:                                # an empty session: a fresh document
            seq = eng.manager.new_seq(eng.namespace.root(req.salt), row_reads(req.namespace) or None)
            seq.cacheable = eng.prefix_caching
        else:
            seq = eng.manager.fork(s.seq)
        req.seq, req.state, req.seg_slot0 = seq, s.state, s.seg_slot0
        req.cached_tokens = max(req.cached_tokens, seq.n_tokens)

    def finish(self, req, ok: bool) -> None:
        """A session request ended: on success the session adopts its K/V and state."""
        s = req.session
        s.busy, s.last_used = None, time.monotonic()
        if not ok or req.seq is None:
            return                                      # the fork is freed by the scheduler; the session is as it was
        old = s.seq
        s.namespaces.update(row_reads(req.namespace))   # its state and K/V now carry what those rows gave
        s.tokens, s.seq, s.seg_slot0 = list(req.tokens), req.seq, req.seg_slot0
        s.state = self.engine.runner.row_state(req.state)   # its own row (not a view of the last batch)
        req.seq = None                                  # the session owns the blocks now
        if old is not None:
            self.engine.manager.free(old)

    # -- tiers ---------------------------------------------------------------------------------
    def offload(self, tenant: str, sid: str) -> int:
        """Move an idle session's blocks to host memory, freeing them in the pool; returns how many."""
        s = self.get(tenant, sid)
        if s.busy:
            raise SessionError(f"session {sid!r} is in use by request {s.busy!r}")
        return self._to_host(s)

    def _to_host(self, s: MemorySession) -> int:
        if s.seq is None or s.host_kv is not None:
            return 0
        eng, seq = self.engine, s.seq
        n = len(seq.blocks)
        s.host_kv = eng.cache.read_blocks(seq.block_ids).cpu() if n else torch.zeros(0, *eng.spec.block_shape)
        s.host_seq = _seq_fields(seq)
        eng.manager.free(seq)
        s.seq = None
        return n

    def _to_device(self, s: MemorySession) -> None:
        if s.host_kv is None:
            return
        eng = self.engine
        n = s.host_kv.shape[0]
        blocks = eng.pool.allocate(n) if n else []       # raises MemoryError when the pool is short
        if n:
            eng.cache.write_blocks([b.id for b in blocks], s.host_kv)
        f = s.host_seq
        s.seq = SeqKV(eng.namespace.root(None), blocks, f["n_slots"], f["start"], f["n_tokens"], f["n_dropped"],
                      [], False)
        s.host_kv = s.host_seq = None

    def reclaim(self, blocks: int) -> int:
        """Offload idle sessions, least recently used first, until `blocks` blocks were freed."""
        freed = 0
        for s in sorted(self.sessions.values(), key=lambda x: x.last_used):
            if freed >= blocks:
                break
            if not s.busy and s.seq is not None and s.seq.blocks:
                before = self.engine.pool.num_free
                self._to_host(s)
                freed += self.engine.pool.num_free - before
        return freed

    def need_blocks(self, s: MemorySession) -> int:
        return 0 if s.host_kv is None else s.host_kv.shape[0]

    # -- export / import -----------------------------------------------------------------------
    def export(self, tenant: str, sid: str, path: str | Path) -> Path:
        """Write a session: `<path>.json`, a sealed document (memstack/atomic.py: kind, format and
        every field under one SHA-256) holding the tenant, id, namespace, tokens, K/V bookkeeping
        and state structure, and naming one content-addressed tensor file by its SHA-256. Atomic;
        the directory is locked while it is written."""
        from memstack.atomic import StoreLock, clean_temporaries, remove_unreferenced, save_tensors_versioned, write_sealed
        from memstack.memory.state import _flatten

        s = self.get(tenant, sid)
        if s.busy:
            raise SessionError(f"session {sid!r} is in use by request {s.busy!r}; export it when it finishes")
        eng = self.engine
        if s.seq is not None:
            kv = eng.cache.read_blocks(s.seq.block_ids).cpu() if s.seq.blocks else torch.zeros(0, *eng.spec.block_shape)
            seqf = _seq_fields(s.seq)
        elif s.host_kv is not None:
            kv, seqf = s.host_kv, dict(s.host_seq)
        else:
            kv, seqf = torch.zeros(0, *eng.spec.block_shape), None
        flat: dict[str, Tensor] = {"kv": kv.contiguous()}
        skel = _flatten(s.state, "state", flat) if s.state is not None else None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with StoreLock(path.parent):
            clean_temporaries(path.parent)                                       # of exports that crashed
            name, sha = save_tensors_versioned(flat, path.parent, path.name)
            write_sealed(path.with_name(path.name + ".json"), KIND, FORMAT, {
                "tenant": s.tenant, "id": s.id, "namespace": eng.namespace.to_dict(), "kinds": eng.serving.memory.kinds,
                "tokens": s.tokens, "seq": seqf, "seg_slot0": s.seg_slot0, "state": skel, "tensors": name,
                "sha256": sha, "shape": list(kv.shape), "reads": sorted(s.namespaces)})
            remove_unreferenced(path.parent, path.name, {name})
        return path

    def import_(self, path: str | Path, tenant: str, sid: str | None = None) -> MemorySession:
        """Load an exported session under `tenant` (it must be the tenant that exported it) as
        `sid` (default: its own id). Its K/V stays in host memory until a request uses it."""
        from safetensors.torch import load_file

        from memstack.atomic import read_sealed, sha256_file, tidy, versioned_name_re
        from memstack.errors import IntegrityError
        from memstack.memory.state import _unflatten

        eng, path = self.engine, Path(path)
        manifest = path.with_name(path.name + ".json")

        def read() -> dict:
            return read_sealed(manifest, KIND, FORMAT,
                               {"tenant": str, "id": str, "namespace": dict, "kinds": list, "tokens": list,
                                "seq": (dict, type(None)), "seg_slot0": int, "state": (dict, type(None)),
                                "tensors": str, "sha256": str, "shape": list},
                               older="export the session again with this memstack")

        try:
            tidy(path.parent, lambda: {path.name: read()["tensors"]})           # what a crashed export left
            meta = read()
            ns = CacheNamespace(**meta["namespace"])
        except IntegrityError as e:
            raise SessionError(f"{path}: {e}") from None
        except TypeError as e:
            raise CheckpointError(f"{manifest}: not a memory session export ({e})") from None
        r = _check_name("tenant", tenant)
        if not r and meta["tenant"] != tenant:
            r.append(f"the session belongs to another namespace than {tenant!r}")
        r += [f"the session's state came from another model or engine: {m}" for m in eng.namespace.mismatches(ns)]
        if not r and meta["kinds"] != eng.serving.memory.kinds:
            r.append(f"the session holds state of memories {meta['kinds']}, this model runs {eng.serving.memory.kinds}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < eng.vocab for t in meta["tokens"]):
            r.append("its tokens are not token ids of this model")
        tfile = path.parent / meta["tensors"]
        if not r and (not versioned_name_re(path.name).fullmatch(meta["tensors"]) or not tfile.is_file()
                      or sha256_file(tfile) != meta["sha256"]):
            r.append(f"{tfile.name}: missing or checksum mismatch (corrupted)")
        if not r and tuple(meta["shape"][1:]) != tuple(eng.spec.block_shape):
            r.append(f"its K/V blocks have shape {meta['shape'][1:]}, the engine's are {list(eng.spec.block_shape)}")
        sid = meta["id"] if sid is None else sid
        r += _check_name("session id", sid)
        if not r and (tenant, sid) in self.sessions:
            r.append(f"session {sid!r} already exists in namespace {tenant!r} (close it or import under another id)")
        if r:
            raise SessionError([f"{path}: {x}" for x in r])
        tensors = load_file(str(tfile))
        if "kv" not in tensors or list(tensors["kv"].shape) != meta["shape"]:
            raise SessionError(f"{tfile}: its K/V does not have the shape its manifest records; refusing it")
        s = MemorySession(tenant, sid, [int(t) for t in meta["tokens"]], seg_slot0=int(meta["seg_slot0"]),
                          namespaces={n for n in meta.get("reads", []) if isinstance(n, str)})   # forgettable
        try:
            s.state = _unflatten(meta["state"], tensors, eng.device) if meta["state"] is not None else None
        except (KeyError, TypeError, ValueError, CheckpointError) as e:
            raise SessionError(f"{path}: its state does not fit this model's memories ({e})") from None
        if meta["seq"] is not None:
            s.host_kv, s.host_seq = tensors["kv"], dict(meta["seq"])
        self.sessions[(tenant, sid)] = s
        return s


def _seq_fields(seq: SeqKV) -> dict:
    return {"n_slots": seq.n_slots, "start": seq.start, "n_tokens": seq.n_tokens, "n_dropped": seq.n_dropped}


__all__ = ["MemorySessions", "MemorySession", "SessionError"]
