"""Versioned, checksummed, crash-safe snapshots of a table: commit touched rows, roll back to any
version, export / import the touched-row delta between two versions.

Layout of a store directory:
    HEAD                        {"version": N}: the current version (replaced atomically)
    versions/v000007.json       manifest: parent, kind (full | delta), file, sha256, touched rows, meta
    rows-<sha256[:12]>.safetensors   full: {"weight"}; delta: {"rows" (N,), "values" (N, dim)}

Version 1 is a full snapshot; a commit writes only the rows touched since its parent (a delta),
so the cost of a snapshot follows the update, not the table. Versions form a tree through
their parents: rolling back moves HEAD, and the next commit branches from there. Loading a
version replays its chain from the nearest full snapshot, verifying every file's SHA-256.

Crash safety (memstack/atomic.py's pattern): the rows file is written to a temporary name and
renamed, then the manifest is written atomically, then HEAD. A process killed at any point
leaves HEAD naming a complete, checksummed version (a manifest written after the kill point
but not yet named by HEAD is ignored and overwritten by the next commit).

`MEMSTACK_STORE_CRASH=<stage>` (stages: rows, manifest, head) makes a commit exit the process
abruptly right after that stage -- the test hook for a crash in the middle of a snapshot.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from memstack.atomic import save_tensors_versioned, sha256_file, write_json_atomic
from memstack.errors import CheckpointError

STORE_FORMAT = 1
DELTA_FORMAT = 1


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


class TableStore:
    """Snapshots of one table (a (rows, dim) tensor with a fixed namespace layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.root / "HEAD").is_file()

    def _read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is corrupted: {e}") from None

    @property
    def info(self) -> dict:
        """What the store holds: format, table shape, dtype, namespaces."""
        return self._read_json(self.root / "store.json")

    @property
    def head(self) -> int:
        if not self.exists:
            raise CheckpointError(f"{self.root} is not a table store (no HEAD); create one with `memstack memory snapshot`")
        return int(self._read_json(self.root / "HEAD")["version"])

    def version(self, v: int) -> Version:
        d = self._read_json(self.root / "versions" / f"v{v:06d}.json")
        return Version(d["version"], d["parent"], d["kind"], d["file"], d["sha256"], d["touched"], d["created"], d.get("meta", {}))

    def versions(self) -> list[Version]:
        """Every committed version reachable as a manifest, in number order."""
        out = []
        for p in sorted((self.root / "versions").glob("v*.json")):
            try:
                out.append(self.version(int(p.stem[1:])))
            except CheckpointError:
                continue
        return out

    def chain(self, v: int) -> list[Version]:
        """Versions from the nearest full snapshot up to v, in apply order."""
        out = []
        while True:
            ver = self.version(v)
            out.append(ver)
            if ver.kind == "full":
                return out[::-1]
            v = ver.parent

    def _tensors(self, ver: Version) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        f = self.root / ver.file
        if not f.is_file():
            raise CheckpointError(f"{self.root}: version {ver.version} names {ver.file}, which is missing")
        if sha256_file(f) != ver.sha256:
            raise CheckpointError(f"{f}: checksum mismatch -- version {ver.version} is corrupted; roll back to an earlier one")
        return load_file(str(f))

    def load(self, v: int | None = None) -> Tensor:
        """The table's weight at version v (default HEAD), checksums verified."""
        v = self.head if v is None else v
        weight = None
        for ver in self.chain(v):
            t = self._tensors(ver)
            if ver.kind == "full":
                weight = t["weight"].clone()
            else:
                weight.index_copy_(0, t["rows"], t["values"].to(weight.dtype))
        return weight

    def touched_between(self, a: int, b: int) -> Tensor:
        """Rows that may differ between versions a and b: those written on the path a -> b
        through their common ancestor."""
        def path(v: int) -> list[int]:   # v, its parent, ... up to the first version
            out = []
            while v != 0:
                out.append(v)
                v = self.version(v).parent
            return out

        pa, pb = path(a), path(b)
        common = next((v for v in pa if v in set(pb)), None)
        rows = []
        for p in (pa, pb):
            for v in p:
                if v == common:
                    break
                ver = self.version(v)
                if ver.kind == "full":
                    return torch.arange(self.info["rows"])
                rows.append(self._tensors(ver)["rows"])
        if common is None:
            return torch.arange(self.info["rows"])
        return torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.long)

    # -- writing -------------------------------------------------------------------------------
    def create(self, weight: Tensor, namespaces: list[dict], meta: dict | None = None) -> int:
        """Start a store with `weight` as version 1 (refuses to overwrite an existing store)."""
        if self.exists:
            raise CheckpointError(f"{self.root} already holds a table store (HEAD {self.head}); refusing to overwrite it")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "versions").mkdir(exist_ok=True)
        write_json_atomic(self.root / "store.json", {"format": STORE_FORMAT, "rows": weight.shape[0], "dim": weight.shape[1],
                                                      "dtype": str(weight.dtype).replace("torch.", ""),
                                                      "namespaces": namespaces})
        return self._commit({"weight": weight.detach().contiguous().cpu()}, "full", 0, weight.shape[0], meta)

    def commit(self, weight: Tensor, rows: Tensor, meta: dict | None = None, full: bool = False) -> int:
        """A new version whose parent is HEAD: the current values of `rows` (a delta), or the whole
        table with full=True. Returns the new version number."""
        info = self.info
        if tuple(weight.shape) != (info["rows"], info["dim"]):
            raise CheckpointError(f"{self.root} stores a ({info['rows']}, {info['dim']}) table, got {tuple(weight.shape)}")
        parent = self.head
        if full:
            return self._commit({"weight": weight.detach().contiguous().cpu()}, "full", parent, weight.shape[0], meta)
        rows = torch.unique(rows.detach().cpu().long())
        vals = weight.detach()[rows.to(weight.device)].contiguous().cpu()
        return self._commit({"rows": rows, "values": vals}, "delta", parent, rows.numel(), meta)

    def _commit(self, tensors: dict[str, Tensor], kind: str, parent: int, touched: int, meta: dict | None) -> int:
        v = max([x.version for x in self.versions()] + [0]) + 1
        name, sha = save_tensors_versioned(tensors, self.root, "rows")
        _crash_point("rows")
        write_json_atomic(self.root / "versions" / f"v{v:06d}.json", {
            "format": STORE_FORMAT, "version": v, "parent": parent, "kind": kind, "file": name, "sha256": sha,
            "touched": int(touched), "created": time.time(), "meta": meta or {}})
        _crash_point("manifest")
        write_json_atomic(self.root / "HEAD", {"version": v})
        _crash_point("head")
        return v

    def rollback(self, v: int) -> None:
        """Make version v current (its files are verified first). Later versions stay in the
        store; the next commit branches from v."""
        self.load(v)
        write_json_atomic(self.root / "HEAD", {"version": v})

    # -- deltas between versions ---------------------------------------------------------------
    def export_delta(self, a: int, b: int, path: str | Path) -> dict:
        """Write the rows that differ between versions a and b (values at b) to a safetensors file
        carrying both versions' table checksums. Returns its header."""
        from safetensors.torch import save_file

        wa, wb = self.load(a), self.load(b)
        rows = self.touched_between(a, b)
        rows = rows[(wa[rows] != wb[rows]).flatten(1).any(1)] if rows.numel() else rows
        head = {"format": str(DELTA_FORMAT), "from_version": str(a), "to_version": str(b),
                "base_checksum": tensor_checksum(wa), "target_checksum": tensor_checksum(wb),
                "table": json.dumps({"rows": wa.shape[0], "dim": wa.shape[1], "namespaces": self.info["namespaces"]})}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"rows": rows.contiguous(), "values": wb[rows].contiguous()}, str(tmp), metadata=head)
        os.replace(tmp, path)
        return {**head, "n_rows": int(rows.numel())}

    def import_delta(self, path: str | Path, meta: dict | None = None) -> int:
        """Apply a delta exported from a store holding the same table at the delta's base version
        to HEAD, and commit the result. Refused (nothing written) unless HEAD equals the delta's
        base exactly and the result equals its target exactly."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                head = f.metadata() or {}
                rows, values = f.get_tensor("rows"), f.get_tensor("values")
        except Exception as e:  # noqa: BLE001 -- any parse failure means the file is unusable
            raise CheckpointError(f"{path} is not a readable table delta: {e}") from None
        if head.get("format") != str(DELTA_FORMAT):
            raise CheckpointError(f"{path}: delta format {head.get('format')!r} is not supported")
        table = json.loads(head.get("table", "{}"))
        info = self.info
        reasons = []
        if (table.get("rows"), table.get("dim")) != (info["rows"], info["dim"]):
            reasons.append(f"the delta is for a ({table.get('rows')}, {table.get('dim')}) table, this store holds "
                           f"({info['rows']}, {info['dim']})")
        if table.get("namespaces") != info["namespaces"]:
            reasons.append("the delta's namespace layout differs from this store's")
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
