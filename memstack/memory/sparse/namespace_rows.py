"""Per-namespace rows: the `user:<id>` / `task:<id>` tables a memory reads beside its `knowledge` table.

A memory with per-namespace rows (Engram: hashed N-gram rows in the user's namespace; PKM: user
value rows under the same product keys; Prefix: a few identity rows read as keys/values,
memory/learned/user_prefix.py) owns one `NamespaceRows`. It holds, per namespace that
has learned something, a small `SparseTable` with that one namespace (same addressing as the
memory's knowledge rows, its own, smaller layout). A forward call reads, for each row of the
batch, the tables of that row's namespaces (`StepContext.namespaces`, set by a serving engine
from the request's tenant, user and task: one name, or a (user, task) tuple whose tables are both
added) -- nothing else selects them -- and adds them to what the knowledge rows give. A namespace without a table reads nothing: its rows see exactly the
knowledge-only model, so one user's rows cannot change another user's logits (tested to exact
equality in a packed step).

The tables are not parameters of the model (they are per-user data, created and forgotten
while serving); `state_dict` never holds them. They are written only by an online update
(memory/sparse/online.py) through the namespace's `WriteGrant`, and persisted per namespace by a
`TableStore` (the server's memory service, memstack/server/memory_api.py).

Concurrency: a serving engine reads `table(name)` from its thread; a learner computes a new
table on a copy, reads it through `staged(name, table)` (a context variable: visible only to the
learner's own thread), and the engine thread `install`s it between two steps -- the next
request of that namespace reads the new version, and no forward ever sees a half-written table.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
from torch import Tensor

from memstack.memory.base import row_reads
from memstack.memory.sparse.table import NamespaceError, NamespaceSpec, SparseTable, namespace_reasons


class NamespaceRows:
    """namespace -> SparseTable of `rows` rows of width `dim` (see the module docstring)."""

    def __init__(self, rows: int, dim: int, addressing: str = "hashed", write_quota: int | None = None,
                 init: Callable[[Tensor], None] | None = None):
        """`init(weight)`: fills a fresh table in place (no grad) -- the same for every namespace,
        and it must read as nothing (e.g. keys set, values zero); None: all zero."""
        if rows < 1 or dim < 1:
            raise ValueError(f"per-namespace rows need rows >= 1 and dim >= 1, got ({rows}, {dim})")
        self.rows, self.dim, self.addressing, self.write_quota = rows, dim, addressing, write_quota
        self.init = init
        self._tables: dict[str, SparseTable] = {}
        self._versions: dict[str, int] = {}     # namespace -> install number (never reused; 0: no table)
        self._installs = 0
        self._new_staged()

    def _new_staged(self) -> None:
        self._staged: contextvars.ContextVar[dict[str, SparseTable]] = contextvars.ContextVar(
            f"staged_rows_{id(self)}", default={})

    def __getstate__(self) -> dict:
        """Copies (copy.deepcopy of a model, pickling) take the installed tables, not what another
        thread has staged (a context variable cannot be copied)."""
        return {k: v for k, v in self.__dict__.items() if k != "_staged"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._new_staged()

    # -- reading (any thread) --------------------------------------------------------------------
    def table(self, name: str | None) -> SparseTable | None:
        """The table a row of namespace `name` reads (a staged one first), or None."""
        if name is None:
            return None
        staged = self._staged.get()
        if name in staged:
            return staged[name]
        return self._tables.get(name)

    def version(self, name: str | None) -> int:
        """Which installed table `name` reads: 0 when it has none, else a number no other install
        of this object ever had. K/V computed under one version must not be reused under another
        (a serving engine keys its prefix cache with it)."""
        return self._versions.get(name, 0) if name is not None else 0

    def any_for(self, names: list) -> bool:
        """Whether a row of `names` (StepContext.namespaces entries: a name, a tuple, None) reads a table."""
        return any(self.table(n) is not None for e in names for n in row_reads(e))

    @property
    def names(self) -> list[str]:
        return sorted(self._tables)

    def read(self, names: list, local: Tensor) -> list[tuple[Tensor, Tensor]]:
        """For each namespace with a table that rows of the call read (a row's entry: one name, or
        a tuple it reads together): (those batch rows `at` (b,), that table read at their local
        rows `local[at]` (b, ..., dim), with a sparse gradient); [] when no row reads a table.
        `local` is (B, ...) (an expanded view is fine)."""
        groups: dict[str, list[int]] = {}
        for b, e in enumerate(names):
            for n in row_reads(e):
                if self.table(n) is not None:
                    groups.setdefault(n, []).append(b)
        out = []
        for n, idx in groups.items():
            at = torch.tensor(idx, device=local.device)
            out.append((at, self.table(n).namespace(n).gather(local[at])))   # (b, ..., dim), sparse grad
        return out

    def add_to(self, base: Tensor, names: list, local: Tensor) -> Tensor:
        """`base` (B, ..., dim) plus, for each batch row, the rows at local rows `local` (B, ...)
        of every table its namespaces have (a row's entry: one name, or a tuple it reads together
        -- a user's and a task's rows are both added, in the tuple's order). Rows of other
        namespaces are left exactly as they are -- values and memory layout (an out-of-place
        index_put keeps the strides), so every later kernel computes them bit for bit as without
        any user rows."""
        out = base
        for at, vals in self.read(names, local):
            out = out.index_put((at,), out[at] + vals.to(out.dtype))          # out of place: autograd-safe
        return out

    # -- writing (the engine thread, or a learner on its own copy) ------------------------------
    def new_table(self, name: str) -> SparseTable:
        """A fresh table for namespace `name` (all zero, or what `init` sets; reads as nothing until it learns)."""
        if reasons := namespace_reasons(name):
            raise NamespaceError("; ".join(reasons))
        if name == "knowledge":
            raise NamespaceError("'knowledge' rows are the memory's own table, not a per-namespace one")
        t = SparseTable([NamespaceSpec(name, self.rows, self.addressing, self.write_quota)], self.dim)
        with torch.no_grad():
            t.weight.zero_()
            if self.init is not None:
                self.init(t.weight)
        return t

    def copy_of(self, name: str) -> SparseTable:
        """A private copy of `name`'s current table (a fresh table if it has none)."""
        t = self.new_table(name)
        cur = self._tables.get(name)
        if cur is not None:
            with torch.no_grad():
                t.weight.copy_(cur.weight.detach().to(t.weight.device))
        return t

    def install(self, name: str, table: SparseTable | Tensor) -> None:
        """Make `table` (or a weight tensor) what rows of `name` read from now on."""
        if isinstance(table, Tensor):
            w, table = table, self.new_table(name)
            if tuple(w.shape) != (self.rows, self.dim):
                raise NamespaceError(f"a table of {name!r} is ({self.rows}, {self.dim}), got {tuple(w.shape)}")
            with torch.no_grad():
                table.weight.copy_(w)
        if table.specs[0].name != name or table.n_rows != self.rows or table.dim != self.dim:
            raise NamespaceError(f"that table is not one of {name!r} ({self.rows}, {self.dim})")
        table.weight.requires_grad_(False)
        self._tables[name] = table
        self._installs += 1
        self._versions[name] = self._installs

    def drop(self, name: str) -> bool:
        """Forget `name`'s rows; True if it had any."""
        self._versions.pop(name, None)
        return self._tables.pop(name, None) is not None

    @contextlib.contextmanager
    def staged(self, name: str, table: SparseTable) -> Iterator[SparseTable]:
        """Within the block, in this thread only, rows of `name` read `table`."""
        token = self._staged.set({**self._staged.get(), name: table})
        try:
            yield table
        finally:
            self._staged.reset(token)

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of one namespace's table (or of a table of this layout when it has none yet)."""
        return self.rows * self.dim * 4


__all__ = ["NamespaceRows"]
