"""The sparse memory table substrate: one table abstraction, three addressing modes, namespaces.

A `SparseTable` is one (rows, dim) weight partitioned into **namespaces**, each a contiguous
range of rows with its own addressing mode:

    hashed       content-addressed: a hash of the input (Engram's token N-grams) picks rows;
                 lossy (collisions), deterministic, so rows can be fetched before the layer runs
    product_key  learned-query: a query scores product keys, the top-k rows are read (PKM /
                 Memory+); data-dependent, so not prefetchable before the layer
    identity     identity-keyed (user / task / tenant ids): collision-free, one row per key,
                 admission by frequency and expiry by TTL (memory/sparse/identity.py)

Namespace names are `knowledge`, `user:<id>` or `task:<id>`. Every read and every write goes
through a `Namespace` handle, which only accepts *local* row numbers in [0, rows) of its own
range (or -1, a miss) and adds its offset: there is no call that takes a global row number from
a caller, so rows of one user can never be read or written through another user's key
(tests/memory/sparse/test_table.py tries).

The weight is an `nn.Parameter` with a *sparse* gradient (ops/gather): an optimizer group with
`optimizer: adam | rowwise_adagrad` (train/optim.py) updates only the rows a batch touched.
Where the weight lives is a runtime choice (memory/sparse/offload.py): on the device, in
(pinned) host memory, or memory-mapped from a file; under torch.distributed it can be split
row-wise over the processes (memory/sparse/shard.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from memstack.ops.gather import gather_rows

Addressing = Literal["hashed", "product_key", "identity"]
ADDRESSING = ("hashed", "product_key", "identity")
# a user / task namespace may be scoped by its tenant (`tenant:<name>/user:<id>`, what a server's
# Tenant.namespace derives): the same string then selects a request's table rows and datastore entries
NAMESPACE_RE = re.compile(r"knowledge|(tenant:[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}/)?(user|task):[A-Za-z0-9_.\-]{1,64}")


def namespace_reasons(name: str) -> list[str]:
    if not isinstance(name, str) or not NAMESPACE_RE.fullmatch(name):
        return [f"namespace {name!r} is not 'knowledge', '[tenant:<name>/]user:<id>' or '[tenant:<name>/]task:<id>' "
                "(id: 1-64 of A-Z a-z 0-9 _ . -)"]
    return []


def quota_reasons(name: str, quota: object) -> list[str]:
    """A write quota is a positive integer (rows per version); "no quota" is spelled None."""
    if quota is None or (isinstance(quota, int) and not isinstance(quota, bool) and quota >= 1):
        return []
    return [f"{name} must be a positive integer (rows per version) or None for no quota, got {quota!r}"]


@dataclass(frozen=True)
class NamespaceSpec:
    """One namespace of a table: `rows` rows addressed by `addressing`.

    write_quota: rows one online update (one version) may write in this namespace; None = no cap.
    """

    name: str
    rows: int
    addressing: Addressing = "hashed"
    write_quota: int | None = None

    def reasons(self) -> list[str]:
        r = namespace_reasons(self.name)
        if self.rows < 1:
            r.append(f"namespace {self.name!r}: rows must be >= 1, got {self.rows}")
        if self.addressing not in ADDRESSING:
            r.append(f"namespace {self.name!r}: addressing {self.addressing!r} is not one of {list(ADDRESSING)}")
        r += quota_reasons(f"namespace {self.name!r}: write_quota", self.write_quota)
        return r


class NamespaceError(ValueError):
    """A row number outside the namespace, or an unknown namespace."""


@dataclass(frozen=True)
class Namespace:
    """A handle on one namespace of one table. Holds no tensors; reads/writes go to the table."""

    table: "SparseTable"
    spec: NamespaceSpec
    offset: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def rows(self) -> int:
        return self.spec.rows

    def to_global(self, local: Tensor, allow_miss: bool = True) -> Tensor:
        """Local row numbers (any shape, int) -> global rows of the table; -1 stays -1 (a miss).
        Anything outside [0, rows) (or -1 when misses are allowed) is refused, never wrapped."""
        local = local.long()
        lo = -1 if allow_miss else 0
        if local.numel() and (int(local.min()) < lo or int(local.max()) >= self.rows):
            bad = local[(local < lo) | (local >= self.rows)].flatten()[:5].tolist()
            raise NamespaceError(f"rows {bad} are outside namespace {self.name!r} (valid: 0..{self.rows - 1}"
                                 f"{', or -1 for a miss' if allow_miss else ''})")
        return torch.where(local >= 0, local + self.offset, local)

    def gather(self, local: Tensor, prefetched: Tensor | None = None) -> Tensor:
        """Rows (..., dim) at local row numbers (...); -1 gives zeros. Sparse gradient."""
        return self.table._gather(self.to_global(local), prefetched)

    def read(self, local: Tensor) -> Tensor:
        """A detached copy of rows (N, dim) (no gradient), for inspection and online updates."""
        with torch.no_grad():
            return self.table._gather(self.to_global(local, allow_miss=False)).clone()

    def write_(self, local: Tensor, values: Tensor) -> None:
        """Overwrite rows in place. Online updates call this only after their safety policy
        (memory/sparse/online.py) has accepted the values."""
        g = self.to_global(local, allow_miss=False)
        if values.shape != (g.numel(), self.table.dim):
            raise NamespaceError(f"values must have shape ({g.numel()}, {self.table.dim}), got {tuple(values.shape)}")
        self.table._write(g, values)


class SparseTable(nn.Module):
    """(rows, dim) weight split into namespaces (see the module docstring).

    `weight` is a Parameter marked `sparse_grad = True`: its gradient is a sparse COO tensor, and
    train/optim.py refuses to put it in a dense optimizer group.
    """

    def __init__(self, namespaces: list[NamespaceSpec] | tuple[NamespaceSpec, ...], dim: int, init_std: float = 0.02,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        reasons = [r for ns in namespaces for r in ns.reasons()]
        names = [ns.name for ns in namespaces]
        reasons += [f"namespace {n!r} appears {names.count(n)} times" for n in sorted(set(names)) if names.count(n) > 1]
        if not namespaces:
            reasons.append("a table needs at least one namespace")
        if dim < 1:
            reasons.append(f"dim must be >= 1, got {dim}")
        if reasons:
            raise NamespaceError("; ".join(reasons))
        self.specs = tuple(namespaces)
        self.dim = dim
        offsets, o = {}, 0
        for ns in namespaces:
            offsets[ns.name] = o
            o += ns.rows
        self.offsets = offsets
        self.n_rows = o
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(o, dim, dtype=dtype))
        self.weight.sparse_grad = True   # read by train/optim.py
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)

    def namespace(self, name: str) -> Namespace:
        for ns in self.specs:
            if ns.name == name:
                return Namespace(self, ns, self.offsets[name])
        raise NamespaceError(f"table has no namespace {name!r}; it has {[s.name for s in self.specs]}")

    @property
    def namespaces(self) -> list[Namespace]:
        return [self.namespace(s.name) for s in self.specs]

    def namespace_of(self, global_rows: Tensor) -> list[str]:
        """The namespace name of each global row (for reports, deltas and quotas)."""
        starts = torch.tensor([self.offsets[ns.name] for ns in self.specs])
        at = torch.searchsorted(starts, global_rows.reshape(-1).cpu().long(), right=True) - 1
        return [self.specs[i].name for i in at.tolist()]

    # -- the only two places rows are touched (namespaces call them with checked global rows) --
    def _gather(self, rows: Tensor, prefetched: Tensor | None = None) -> Tensor:
        for rec in _RECORDERS:
            if rec.table is self:
                rec.add(rows)
        w = self.weight
        shard = getattr(self, "shard", None)
        if shard is not None:                                   # row-sharded over processes (shard.py)
            from memstack.memory.sparse.shard import sharded_gather

            return sharded_gather(w, rows.to(w.device), self.n_rows, shard[1]).to(rows.device)
        if rows.device != w.device and prefetched is None:   # an offloaded table: gather where it lives
            out = gather_rows(w, rows.to(w.device))
            return out.to(rows.device, non_blocking=True)
        return gather_rows(w, rows, prefetched)

    def _write(self, rows: Tensor, values: Tensor) -> None:
        if getattr(self, "shard", None) is not None:
            raise NotImplementedError("online writes to a row-sharded table are not supported; update an unsharded copy")
        with torch.no_grad():
            self.weight.index_copy_(0, rows.to(self.weight.device), values.to(self.weight.device, self.weight.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A row-sharded table's rows are saved by every rank beside the checkpoint (shard.py),
        not in the weights file."""
        if getattr(self, "shard", None) is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = buf if keep_vars else buf.detach()

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        spaces = ", ".join(f"{s.name}:{s.addressing}x{s.rows}" for s in self.specs)
        return f"rows={self.n_rows}, dim={self.dim}, namespaces=[{spaces}]"


_RECORDERS: list["AccessRecorder"] = []   # active `record_accesses` blocks (empty outside them)


class AccessRecorder:
    """Per-row access counts of one table while active (observability, and the term/document
    frequencies of sparse memory finetuning's slot selection)."""

    def __init__(self, table: SparseTable):
        self.table = table
        self.counts = torch.zeros(table.n_rows, dtype=torch.int64)    # lookups per row
        self.docs = torch.zeros(table.n_rows, dtype=torch.int64)      # "documents" (see next_doc) touching a row
        self.n_docs = 0
        self._doc_rows: list[Tensor] = []

    def add(self, rows: Tensor) -> None:
        r = rows.detach().reshape(-1).cpu()
        r = r[r >= 0]
        self.counts += torch.bincount(r, minlength=self.table.n_rows)
        self._doc_rows.append(r)

    def next_doc(self) -> None:
        """Close the current document: every row it touched counts once in `docs`."""
        if self._doc_rows:
            self.docs[torch.unique(torch.cat(self._doc_rows))] += 1
        self._doc_rows = []
        self.n_docs += 1

    def __enter__(self) -> "AccessRecorder":
        _RECORDERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._doc_rows:
            self.next_doc()
        _RECORDERS.remove(self)


def record_accesses(table: SparseTable) -> AccessRecorder:
    """`with record_accesses(table) as rec: model(...)`: rec.counts[r] = lookups of row r."""
    return AccessRecorder(table)
