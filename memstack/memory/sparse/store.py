"""Versioned, checksummed, crash-safe snapshots of a table: commit touched rows, roll back to any
version, export / import the touched-row delta between two versions.

Layout of a store directory (every JSON document sealed: memstack/atomic.py):
    store.json                  the table: rows, dim, dtype, namespaces
    versions/v000007.json       a version: parent (and the parent manifest's checksum), snapshot
                                (full | delta), rows file + its SHA-256, touched rows, meta, and the
                                checksum of store.json
    HEAD                        the current version, its manifest's checksum, and `last`: the
                                highest committed version number
    rows-<sha256[:12]>.safetensors   full: {"weight"}; delta: {"rows" (N,), "values" (N, dim)}
    .lock                       held by the one writer (memstack/atomic.py's StoreLock)

Version 1 is a full snapshot; a commit writes only the rows touched since its parent (a delta),
so the cost of a snapshot follows the update, not the table. Versions form a tree through
their parents (a parent is always an earlier version, so no walk can loop): rolling back moves
HEAD, and the next commit branches from there. Every manifest is signed by its children (they
record its checksum) and the current one by HEAD, so loading a version verifies the chain from
HEAD (or from the version asked for) down to the nearest full snapshot, every document's seal and
every rows file's SHA-256. Any edit, truncation or type change of any file is refused with an
error naming it; nothing is silently skipped.

Crash safety: the rows file is written to a temporary name and renamed, then the manifest, then
HEAD. A version exists once HEAD's `last` counts it: a manifest or rows file written by a commit
that died before HEAD moved is never listed, and is removed -- with temporaries left by a dead
writer -- the next time the store is opened by a process that can take the writer lock.

`MEMSTACK_STORE_CRASH=<stage>` (stages: rows, manifest, head) makes a commit exit the process
abruptly right after that stage -- the test hook for a crash in the middle of a snapshot.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from memstack.atomic import (StoreLock, clean_temporaries, read_sealed, save_safetensors, save_tensors_versioned,
                             sha256_file, versioned_name_re, write_sealed)
from memstack.errors import CheckpointError, IntegrityError

STORE_FORMAT = 2
DELTA_FORMAT = 2
KIND_STORE, KIND_VERSION, KIND_HEAD = "memstack-table-store", "memstack-table-version", "memstack-table-head"
MIGRATE = "run `memstack migrate {path}` to verify its files and add the checksums"
_VERSION_NAME = re.compile(r"v(\d{6,})\.json")


def tensor_checksum(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes (row-major, its own dtype)."""
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _crash_point(stage: str) -> None:
    if os.environ.get("MEMSTACK_STORE_CRASH") == stage:
        os._exit(86)   # no cleanup, no flush: as abrupt as a kill


@dataclass(frozen=True)
class Version:
    version: int
    parent: int
    kind: str                 # "full" | "delta"
    file: str
    sha256: str
    touched: int
    created: float
    meta: dict
    checksum: str = ""        # of its manifest (what its children and HEAD record)
    parent_manifest: str | None = None


_VERSION_FIELDS = {"version": int, "parent": int, "parent_manifest": (str, type(None)), "store": str, "snapshot": str,
                   "file": str, "sha256": str, "touched": int, "created": (int, float), "meta": dict}


class TableStore:
    """Snapshots of one table (a (rows, dim) tensor with a fixed namespace layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cleaned: list[Path] = []       # orphans removed when this store was opened
        self._opened = False
        self._info: dict | None = None

    # -- reading -------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.root / "HEAD").is_file()

    def _open(self) -> None:
        """On first use: remove what an interrupted write left, if no writer is active."""
        if self._opened:
            return
        self._opened = True
        if not self.exists:
            return
        lock = StoreLock(self.root)
        try:
            if not lock.acquire(blocking=False):
                return
        except OSError:
            return                           # read-only store: nothing to clean, nothing to lock
        try:
            self.cleaned = self._clean()
        finally:
            lock.release()

    def _head_doc(self) -> dict:
        if not self.exists:
            raise CheckpointError(f"{self.root} is not a table store (no HEAD); create one with `memstack memory snapshot`")
        self._open()
        doc = read_sealed(self.root / "HEAD", KIND_HEAD, STORE_FORMAT, {"version": int, "manifest": str, "last": int},
                          older=MIGRATE.format(path=self.root))
        if not 1 <= doc["version"] <= doc["last"]:
            raise IntegrityError(f"{self.root / 'HEAD'} names version {doc['version']} of 1..{doc['last']}: corrupted")
        return doc

    @property
    def info(self) -> dict:
        """What the store holds: format, table shape, dtype, namespaces (and its checksum). Read
        and verified once per TableStore object (store.json never changes after `create`)."""
        if self._info is not None:
            return self._info
        doc = read_sealed(self.root / "store.json", KIND_STORE, STORE_FORMAT,
                          {"rows": int, "dim": int, "dtype": str, "namespaces": list}, older=MIGRATE.format(path=self.root))
        if doc["rows"] < 1 or doc["dim"] < 1:
            raise IntegrityError(f"{self.root / 'store.json'} describes a ({doc['rows']}, {doc['dim']}) table: corrupted")
        self._info = doc
        return doc

    @property
    def head(self) -> int:
        return self._head_doc()["version"]

    @property
    def last(self) -> int:
        """The highest committed version number (versions are 1..last)."""
        return self._head_doc()["last"]

    def _manifest(self, v: int) -> Path:
        return self.root / "versions" / f"v{v:06d}.json"

    def version(self, v: int, *, last: int | None = None) -> Version:
        """The manifest of committed version v, verified (seal, fields, its own number, parent
        before it, the store it belongs to)."""
        last = self.last if last is None else last
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= last:
            raise CheckpointError(f"{self.root} has no version {v!r} (its versions are 1..{last}; "
                                  f"{self._manifest(v).name if isinstance(v, int) else v} is missing)")
        path = self._manifest(v)
        d = read_sealed(path, KIND_VERSION, STORE_FORMAT, _VERSION_FIELDS, older=MIGRATE.format(path=self.root))
        bad = []
        if d["version"] != v:
            bad.append(f"it says it is version {d['version']}")
        if not 0 <= d["parent"] < v:
            bad.append(f"its parent {d['parent']} is not an earlier version")
        if (d["parent"] == 0) != (d["parent_manifest"] is None):
            bad.append("its parent and the parent's checksum disagree")
        if d["snapshot"] not in ("full", "delta") or (d["snapshot"] == "delta" and d["parent"] == 0):
            bad.append(f"snapshot {d['snapshot']!r}")
        if d["store"] != self.info["checksum"]:
            bad.append("it belongs to another store.json")
        if bad:
            raise IntegrityError(f"{path} is inconsistent: " + "; ".join(bad))
        return Version(d["version"], d["parent"], d["snapshot"], d["file"], d["sha256"], d["touched"], d["created"],
                       d["meta"], d["checksum"], d["parent_manifest"])

    def versions(self) -> list[Version]:
        """Every committed version, in number order (any unreadable one is an error, never skipped)."""
        last = self.last
        return [self.version(v, last=last) for v in range(1, last + 1)]

    def chain(self, v: int, expect: str | None = None) -> list[Version]:
        """Versions from the nearest full snapshot up to v, in apply order, each link verified:
        every manifest's checksum is the one its child (or `expect`, e.g. HEAD's) records."""
        out, last = [], self.last
        while True:
            ver = self.version(v, last=last)
            if expect is not None and ver.checksum != expect:
                who = f"version {out[-1].version}" if out else "HEAD"
                raise IntegrityError(f"{self._manifest(v)} is not the manifest {who} was committed on (its checksum "
                                     "differs): the store was tampered with or mixed with another")
            out.append(ver)
            if ver.kind == "full":
                return out[::-1]
            v, expect = ver.parent, ver.parent_manifest

    def _tensors(self, ver: Version) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        f = self.root / ver.file
        if not versioned_name_re("rows").fullmatch(ver.file) or not f.is_file():
            raise CheckpointError(f"{self.root}: version {ver.version} names {ver.file}, which is missing")
        if sha256_file(f) != ver.sha256:
            raise CheckpointError(f"{f}: checksum mismatch -- version {ver.version} is corrupted; roll back to an earlier one")
        t = load_file(str(f))
        info = self.info
        want = {"weight"} if ver.kind == "full" else {"rows", "values"}
        ok = set(t) == want
        if ok and ver.kind == "full":
            ok = tuple(t["weight"].shape) == (info["rows"], info["dim"])
        elif ok:
            r = t["rows"]
            ok = (r.dim() == 1 and r.dtype == torch.int64 and tuple(t["values"].shape) == (r.numel(), info["dim"])
                  and (r.numel() == 0 or (int(r.min()) >= 0 and int(r.max()) < info["rows"])))
        if not ok:
            raise IntegrityError(f"{f}: its tensors do not fit the ({info['rows']}, {info['dim']}) table of this store")
        return t

    def load(self, v: int | None = None) -> Tensor:
        """The table's weight at version v (default HEAD), every link and checksum verified."""
        if v is None:
            head = self._head_doc()
            chain = self.chain(head["version"], expect=head["manifest"])
        else:
            chain = self.chain(v)
        weight = None
        for ver in chain:
            t = self._tensors(ver)
            if ver.kind == "full":
                weight = t["weight"].clone()
            else:
                weight.index_copy_(0, t["rows"], t["values"].to(weight.dtype))
        return weight

    def touched_between(self, a: int, b: int) -> Tensor:
        """Rows that may differ between versions a and b: those written on the path a -> b
        through their common ancestor."""
        last = self.last

        def path(v: int) -> list[int]:   # v, its parent, ... up to the first version (parents decrease)
            out = []
            while v != 0:
                out.append(v)
                v = self.version(v, last=last).parent
            return out

        pa, pb = path(a), path(b)
        common = next((v for v in pa if v in set(pb)), None)
        rows = []
        for p in (pa, pb):
            for v in p:
                if v == common:
                    break
                ver = self.version(v, last=last)
                if ver.kind == "full":
                    return torch.arange(self.info["rows"])
                rows.append(self._tensors(ver)["rows"])
        if common is None:
            return torch.arange(self.info["rows"])
        return torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.long)

    # -- writing -------------------------------------------------------------------------------
    def _clean(self, rows_files: bool = True) -> list[Path]:
        """Under the writer lock: remove what no committed version references -- manifests past
        HEAD's `last`, temporaries of dead writers and (with `rows_files`: reads every manifest,
        so only on open) rows files. Returns what was removed."""
        removed = clean_temporaries(self.root, legacy=True) + clean_temporaries(self.root / "versions", legacy=True)
        try:
            last = read_sealed(self.root / "HEAD", KIND_HEAD, STORE_FORMAT, {"last": int})["last"]
        except IntegrityError:
            return removed                   # a store we cannot read: touch nothing else
        for p in sorted((self.root / "versions").glob("v*.json")):
            m = _VERSION_NAME.fullmatch(p.name)
            if m and int(m[1]) > last:
                p.unlink(missing_ok=True)
                removed.append(p)
        if not rows_files:
            return removed
        try:
            keep = {self.version(v, last=last).file for v in range(1, last + 1)}
        except CheckpointError:
            return removed                   # a damaged version: keep every rows file for recovery
        pat = versioned_name_re("rows")
        for p in self.root.glob("rows-*.safetensors"):
            if pat.fullmatch(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def create(self, weight: Tensor, namespaces: list[dict], meta: dict | None = None) -> int:
        """Start a store with `weight` as version 1 (refuses to overwrite an existing store)."""
        if self.exists:
            raise CheckpointError(f"{self.root} already holds a table store (HEAD {self.head}); refusing to overwrite it")
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        with StoreLock(self.root):
            if self.exists:
                raise CheckpointError(f"{self.root} already holds a table store; refusing to overwrite it")
            for p in list((self.root / "versions").glob("v*.json")) + list(self.root.glob("rows-*.safetensors")):
                p.unlink()                   # left by a create that died before its HEAD: never a version
            clean_temporaries(self.root, legacy=True)
            self._info = None
            write_sealed(self.root / "store.json", KIND_STORE, STORE_FORMAT, {
                "rows": weight.shape[0], "dim": weight.shape[1], "dtype": str(weight.dtype).replace("torch.", ""),
                "namespaces": namespaces})
            self._opened = True
            return self._commit({"weight": weight.detach().contiguous().cpu()}, "full", 0, weight.shape[0], meta, last=0)

    def commit(self, weight: Tensor, rows: Tensor, meta: dict | None = None, full: bool = False) -> int:
        """A new version whose parent is HEAD: the current values of `rows` (a delta), or the whole
        table with full=True. Returns the new version number."""
        info = self.info
        if tuple(weight.shape) != (info["rows"], info["dim"]):
            raise CheckpointError(f"{self.root} stores a ({info['rows']}, {info['dim']}) table, got {tuple(weight.shape)}")
        with StoreLock(self.root):
            self.cleaned += self._clean(rows_files=False)
            head = self._head_doc()
            parent = self.version(head["version"], last=head["last"])
            if parent.checksum != head["manifest"]:
                raise IntegrityError(f"{self._manifest(parent.version)} is not the manifest HEAD was committed on")
            if full:
                return self._commit({"weight": weight.detach().contiguous().cpu()}, "full", parent, weight.shape[0],
                                    meta, last=head["last"])
            rows = torch.unique(rows.detach().cpu().long())
            vals = weight.detach()[rows.to(weight.device)].contiguous().cpu()
            return self._commit({"rows": rows, "values": vals}, "delta", parent, rows.numel(), meta, last=head["last"])

    def _commit(self, tensors: dict[str, Tensor], kind: str, parent: Version | int, touched: int, meta: dict | None,
                last: int) -> int:
        v = last + 1
        json.dumps(meta or {}, allow_nan=False)          # an unserialisable meta fails before anything is written
        name, sha = save_tensors_versioned(tensors, self.root, "rows")
        _crash_point("rows")
        checksum = write_sealed(self._manifest(v), KIND_VERSION, STORE_FORMAT, {
            "version": v, "parent": parent.version if isinstance(parent, Version) else 0,
            "parent_manifest": parent.checksum if isinstance(parent, Version) else None,
            "store": self.info["checksum"], "snapshot": kind, "file": name, "sha256": sha, "touched": int(touched),
            "created": time.time(), "meta": meta or {}})
        _crash_point("manifest")
        write_sealed(self.root / "HEAD", KIND_HEAD, STORE_FORMAT, {"version": v, "manifest": checksum, "last": v})
        _crash_point("head")
        return v

    def rollback(self, v: int) -> None:
        """Make version v current (its whole chain is verified first). Later versions stay in the
        store; the next commit branches from v."""
        with StoreLock(self.root):
            last = self.last
            self.load(v)
            write_sealed(self.root / "HEAD", KIND_HEAD, STORE_FORMAT,
                         {"version": v, "manifest": self.version(v, last=last).checksum, "last": last})

    # -- deltas between versions ---------------------------------------------------------------
    def export_delta(self, a: int, b: int, path: str | Path) -> dict:
        """Write the rows that differ between versions a and b (values at b) to a safetensors file
        carrying both versions' table checksums, its tensors' checksums and a checksum over all of
        its metadata. Returns its header."""
        wa, wb = self.load(a), self.load(b)
        rows = self.touched_between(a, b)
        rows = rows[(wa[rows] != wb[rows]).flatten(1).any(1)] if rows.numel() else rows
        tensors = {"rows": rows.contiguous(), "values": wb[rows].contiguous()}
        head = {"kind": "memstack-table-delta", "format": str(DELTA_FORMAT), "from_version": str(a), "to_version": str(b),
                "base_checksum": tensor_checksum(wa), "target_checksum": tensor_checksum(wb),
                "rows_checksum": tensor_checksum(tensors["rows"]), "values_checksum": tensor_checksum(tensors["values"]),
                "table": json.dumps({"rows": wa.shape[0], "dim": wa.shape[1], "namespaces": self.info["namespaces"]},
                                    sort_keys=True)}
        head["checksum"] = _delta_checksum(head)
        save_safetensors(tensors, Path(path), metadata=head)
        return {**head, "n_rows": int(rows.numel())}

    def import_delta(self, path: str | Path, meta: dict | None = None) -> int:
        """Apply a delta exported from a store holding the same table at the delta's base version
        to HEAD, and commit the result. Refused (nothing written) unless the file is intact, HEAD
        equals the delta's base exactly and the result equals its target exactly."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                head = f.metadata() or {}
                names = set(f.keys())
                rows, values = f.get_tensor("rows"), f.get_tensor("values")
        except Exception as e:  # noqa: BLE001 -- any parse failure means the file is unusable
            raise CheckpointError(f"{path} is not a readable table delta: {e}") from None
        if head.get("format") != str(DELTA_FORMAT) or head.get("kind") != "memstack-table-delta":
            raise CheckpointError(f"{path}: delta format {head.get('format')!r} is not supported (this memstack reads "
                                  f"format {DELTA_FORMAT}, whose metadata is checksummed): export it again")
        if head.get("checksum") != _delta_checksum(head) or names != {"rows", "values"}:
            raise IntegrityError(f"{path}: its metadata fails its checksum (edited or corrupted): refusing it")
        if tensor_checksum(rows) != head.get("rows_checksum") or tensor_checksum(values) != head.get("values_checksum"):
            raise IntegrityError(f"{path}: its rows / values fail their checksums (corrupted): refusing it")
        table = json.loads(head["table"])
        info = self.info
        reasons = []
        if (table.get("rows"), table.get("dim")) != (info["rows"], info["dim"]):
            reasons.append(f"the delta is for a ({table.get('rows')}, {table.get('dim')}) table, this store holds "
                           f"({info['rows']}, {info['dim']})")
        if table.get("namespaces") != info["namespaces"]:
            reasons.append("the delta's namespace layout differs from this store's")
        if not reasons and not (rows.dtype == torch.int64 and rows.dim() == 1 and values.shape == (rows.numel(), info["dim"])
                                and (rows.numel() == 0 or (int(rows.min()) >= 0 and int(rows.max()) < info["rows"]))):
            reasons.append("its rows / values do not fit the table")
        w = self.load()
        if not reasons and tensor_checksum(w) != head.get("base_checksum"):
            reasons.append(f"HEAD (version {self.head}) is not the delta's base (version {head.get('from_version')} of "
                           "its store); import it onto the same base")
        if not reasons:
            w.index_copy_(0, rows, values.to(w.dtype))
            if tensor_checksum(w) != head.get("target_checksum"):
                reasons.append("applying the delta does not reproduce its target checksum (corrupted or edited)")
        if reasons:
            raise CheckpointError(f"refusing to import {path}:\n" + "\n".join(f"  - {r}" for r in reasons))
        return self.commit(w, rows, {**(meta or {}), "imported": path.name, "from_version": head.get("from_version"),
                                     "to_version": head.get("to_version")})


def _delta_checksum(head: dict[str, str]) -> str:
    body = json.dumps({k: v for k, v in head.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()
