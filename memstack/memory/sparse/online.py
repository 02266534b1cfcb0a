"""Online sparse updates of memory tables: the substrate of continual, per-user learning.

An `OnlineUpdater` learns from new text by changing only table rows -- the dense backbone and
every other parameter stay frozen -- and only the rows the text touches:

1. forward + backward on a batch; the table's gradient is sparse (ops/gather): the touched rows;
2. slot selection (sparse memory finetuning, Lin et al., arXiv 2510.15103): rows are ranked by
   TF-IDF -- TF = lookups of the row in this batch, IDF = log((N + 1) / (df + 1)) with df the
   number of the N background documents (e.g. pretraining text) that touch the row -- and only
   the top `top_t` rows are updated (top_t = None: every touched row);
3. the row optimizer (memory/sparse/row_optim.py's pure functions: lazy Adam, row-wise Adagrad, or
   SGD) proposes new values for those rows;
4. the safety `UpdatePolicy` checks the proposal -- finite values, per-row update norm at most
   `max_row_update_norm`, rows written per namespace since the last commit within the quota
   (`quotas[name]`, else the namespace's `write_quota`) -- and either everything is written
   (rows and their optimizer state) or nothing is, with every reason reported;
5. `commit()` writes the rows touched since the last commit as a new version of a `TableStore`
   (versioned, checksummed, crash-safe; memory/sparse/store.py).

Who may write what (memory/sparse/grants.py): every update names the namespaces it may write --
`"knowledge"` by name, a `user:<id>` / `task:<id>` namespace only through its `WriteGrant` from
the updater's `NamespaceAuthority`. A gradient step leaves the rows of every other namespace as
they are (reported as `withheld`); an explicit write without a valid grant is refused.
Arguments are checked like configs: every bad value reported at once (`ConfigError`).

Deviations from SMF: the paper ranks slots of a PKM memory layer per batch and masks gradients;
here the same ranking applies to any table (Engram or PKM) through per-row access counts; df
counts background documents (the paper's "inverse usage on background data").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memstack.config import Checked
from memstack.errors import ConfigError
from memstack.memory.base import Step
from memstack.memory.sparse.grants import SHARED, NamespaceAccessError, NamespaceAuthority, WriteGrant
from memstack.memory.sparse.store import TableStore
from memstack.memory.sparse.table import SparseTable, namespace_reasons, quota_reasons, record_accesses
from memstack.memory.sparse.row_optim import adagrad_rows, adam_rows

OPTIMIZERS = ("adam", "rowwise_adagrad", "sgd")


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class UpdatePolicy(Checked):
    """What an online update may do. A violating update is rejected whole."""

    max_row_update_norm: float | None = 1.0      # L2 norm of (new - old) per row, finite > 0; None: no cap
    # namespace -> rows writable per version (a positive integer); None: no quota for that
    # namespace, overriding its `write_quota`; namespaces not listed keep their `write_quota`
    quotas: dict[str, int | None] = field(default_factory=dict)

    def check(self) -> list[str]:
        r = []
        if self.max_row_update_norm is not None and not _finite_positive(self.max_row_update_norm):
            r.append(f"max_row_update_norm must be a finite number > 0 (or None for no cap), got {self.max_row_update_norm!r}")
        if not isinstance(self.quotas, dict):
            return r + [f"quotas must map namespace -> quota, got {type(self.quotas).__name__}"]
        for ns, q in self.quotas.items():
            r += [f"quotas: {x}" for x in namespace_reasons(ns)]
            r += quota_reasons(f"quotas[{ns!r}]", q)
        return r

    def reasons(self, table: SparseTable, rows: Tensor, old: Tensor, new: Tensor, pending: dict[str, set[int]]) -> list[str]:
        """Reasons to reject writing `new` (N, dim) over `old` at global `rows` (N,)."""
        r = []
        bad = ~torch.isfinite(new).all(dim=1)
        if bool(bad.any()):
            r.append(f"{int(bad.sum())} row(s) would become NaN/Inf (rows {rows[bad][:5].tolist()})")
        if self.max_row_update_norm is not None:
            norms = torch.nan_to_num((new - old).float().norm(dim=1), nan=math.inf)
            over = norms > self.max_row_update_norm
            if bool(over.any()):
                r.append(f"{int(over.sum())} row update(s) exceed the norm cap {self.max_row_update_norm} "
                         f"(largest {float(norms.max()):.4g}, rows {rows[over][:5].tolist()})")
        names = table.namespace_of(rows)
        for ns in table.namespaces:
            mine = {int(x) for x, n in zip(rows.tolist(), names) if n == ns.name}
            if not mine:
                continue
            quota = self.quotas[ns.name] if ns.name in self.quotas else ns.spec.write_quota
            total = len(pending.get(ns.name, set()) | mine)
            if quota is not None and total > quota:
                r.append(f"namespace {ns.name!r}: {total} rows written since the last commit would exceed its write "
                         f"quota of {quota}")
        return r


@dataclass
class UpdateResult:
    accepted: bool
    reasons: list[str]
    rows: int             # rows updated (0 if rejected)
    touched: int          # rows the batch touched
    loss: float
    withheld: int = 0     # touched rows of namespaces this update may not write (left unchanged)


def updater_reasons(lr: object, optimizer: object, betas: object, eps: object, top_t: object) -> list[str]:
    """Every problem with an OnlineUpdater's arguments (checked like a config)."""
    r = []
    if not _finite_positive(lr):
        r.append(f"lr must be a finite number > 0, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        r.append(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        r.append(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not _finite_positive(eps):
        r.append(f"eps must be a finite number > 0, got {eps!r}")
    if top_t is not None and (not isinstance(top_t, int) or isinstance(top_t, bool) or top_t < 1):
        r.append(f"top_t must be a positive integer or None (every touched row), got {top_t!r}")
    return r


def tfidf_scores(tf: Tensor, df: Tensor, n_docs: int) -> Tensor:
    """TF-IDF per row: tf * log((n_docs + 1) / (df + 1)); rows with tf = 0 score 0."""
    return tf.float() * torch.log((n_docs + 1.0) / (df.float() + 1.0))


def background_frequencies(model: nn.Module, table: SparseTable, batches: list[Tensor]) -> tuple[Tensor, int]:
    """(df (rows,), number of documents): each (B, T) batch row is one background document."""
    model.eval()
    with torch.no_grad(), record_accesses(table) as rec:
        for tokens in batches:
            for row in tokens:
                model(row[None])
                rec.next_doc()
    return rec.docs.clone(), rec.n_docs


class OnlineUpdater:
    """Learn from new text by updating table rows only (see the module docstring)."""

    def __init__(self, model: nn.Module, table: SparseTable, *, lr: float = 1e-2, optimizer: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, policy: UpdatePolicy | None = None,
                 top_t: int | None = None, background: tuple[Tensor, int] | None = None, store: TableStore | None = None,
                 authority: NamespaceAuthority | None = None):
        reasons = updater_reasons(lr, optimizer, betas, eps, top_t)
        if policy is not None and not isinstance(policy, UpdatePolicy):
            reasons.append(f"policy must be an UpdatePolicy, got {type(policy).__name__}")
        if reasons:
            raise ConfigError(reasons, what="online updater")
        # the authority whose grants open user/task namespaces; the default one's key is known
        # to no one, so without an authority only "knowledge" can be written
        self._authority = authority if authority is not None else NamespaceAuthority()
        self.model, self.table = model, table
        self.lr, self.optimizer, self.betas, self.eps = lr, optimizer, betas, eps
        self.policy = policy or UpdatePolicy()
        self.top_t = top_t
        self.df, self.n_docs = background if background is not None else (torch.zeros(table.n_rows, dtype=torch.int64), 0)
        self.store = store
        self.pending: dict[str, set[int]] = {}        # namespace -> rows written since the last commit
        R = table.n_rows
        self.m = torch.zeros_like(table.weight, device="cpu") if optimizer == "adam" else None
        self.v = torch.zeros_like(table.weight, device="cpu") if optimizer == "adam" else None
        self.steps = torch.zeros(R, dtype=torch.int64)
        self.acc = torch.zeros(R, dtype=torch.float32)
        for p in model.parameters():   # a frozen backbone: only the table rows get gradient
            p.requires_grad_(p is table.weight)

    def _loss(self, tokens: Tensor, targets: Tensor, namespace: str | None = None, start=None) -> Tensor:
        names = None if namespace is None else (namespace,) * tokens.shape[0]
        if start is not None:      # the forward from the stored hidden states on (MemoryModel.resume)
            if tuple(start.ctx.tokens.shape) != tuple(tokens.shape) or not torch.equal(start.ctx.tokens, tokens):
                raise ValueError("start was computed for other tokens than this batch's")
            out, _ = self.model.resume(start, namespaces=names)
        else:
            out, _ = self.model(tokens, None, Step(), namespaces=names)
        logits = out.logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    def _writable(self, into: Sequence[str | WriteGrant]) -> set[str]:
        """The namespaces `into` opens: "knowledge" by name, others through a valid grant."""
        if isinstance(into, (str, WriteGrant)):
            into = [into]
        names = set()
        have = {s.name for s in self.table.specs}
        for x in into:
            if isinstance(x, str):
                if x != SHARED:
                    raise NamespaceAccessError(f"writing namespace {x!r} needs its WriteGrant (NamespaceAuthority.grant); "
                                               f"only {SHARED!r} is written by name")
                ns = x
            else:
                ns = self._authority.check(x)
            if ns not in have:
                raise NamespaceAccessError(f"the table has no namespace {ns!r}; it has {sorted(have)}")
            names.add(ns)
        return names

    def step(self, tokens: Tensor, targets: Tensor, *, into: Sequence[str | WriteGrant] = (SHARED,),
             namespace: str | None = None, start=None) -> UpdateResult:
        """One update from a batch (B, T) of tokens and next-token targets (-100: no loss), writing
        only rows of the namespaces `into` opens ("knowledge", and user/task grants). `namespace`:
        the per-row namespace the forward reads as (a user's own rows, memory/sparse/namespace_rows.py).
        `start`: the batch's forward stopped below the first block that reads this table
        (`MemoryModel.run_until`, computed once under no_grad): each step then runs only the blocks
        from there on, forward and backward -- the same loss and gradient, as nothing below changes."""
        writable = self._writable(into)
        self.model.eval()
        w = self.table.weight
        w.grad = None
        with record_accesses(self.table) as rec:
            loss = self._loss(tokens, targets, namespace, start)
        loss.backward()
        g = w.grad.coalesce() if w.grad is not None and w.grad.is_sparse else None
        w.grad = None
        if g is None or g.indices().numel() == 0:
            return UpdateResult(True, [], 0, 0, float(loss.detach()))
        rows, grads = g.indices()[0].cpu(), g.values().cpu()
        touched = rows.numel()
        mine = torch.tensor([ns in writable for ns in self.table.namespace_of(rows)], dtype=torch.bool)
        rows, grads = rows[mine], grads[mine]
        withheld = touched - rows.numel()
        if rows.numel() == 0:
            return UpdateResult(True, [], 0, touched, float(loss.detach()), withheld)
        if self.top_t is not None and rows.numel() > self.top_t:
            score = tfidf_scores(rec.counts[rows], self.df[rows], self.n_docs)
            keep = score.topk(self.top_t).indices
            rows, grads = rows[keep], grads[keep]
        old = w.detach()[rows.to(w.device)].cpu()
        if self.optimizer == "adam":
            new, m, v, st = adam_rows(old, grads, self.m[rows], self.v[rows], self.steps[rows], self.lr, self.betas, self.eps, 0.0)
        elif self.optimizer == "rowwise_adagrad":
            new, acc = adagrad_rows(old, grads, self.acc[rows], self.lr, self.eps, 0.0)
        else:
            new = old - self.lr * grads.to(old.dtype)
        reasons = self.policy.reasons(self.table, rows, old, new, self.pending)
        if reasons:
            return UpdateResult(False, reasons, 0, touched, float(loss.detach()), withheld)
        self.table._write(rows, new)   # rows came from the table's own gradient: inside its namespaces
        if self.optimizer == "adam":
            self.m[rows], self.v[rows], self.steps[rows] = m, v, st
        elif self.optimizer == "rowwise_adagrad":
            self.acc[rows] = acc
        for r, ns in zip(rows.tolist(), self.table.namespace_of(rows)):
            self.pending.setdefault(ns, set()).add(r)
        return UpdateResult(True, [], rows.numel(), touched, float(loss.detach()), withheld)

    def write(self, into: str | WriteGrant, local_rows: Tensor, values: Tensor) -> UpdateResult:
        """Write explicit row values into one namespace -- "knowledge", or the namespace of a
        `WriteGrant` -- under the same policy (all or nothing)."""
        (namespace,) = self._writable([into])
        ns = self.table.namespace(namespace)
        rows = ns.to_global(local_rows, allow_miss=False).reshape(-1).cpu()
        old = ns.read(local_rows.reshape(-1)).cpu()
        reasons = self.policy.reasons(self.table, rows, old, values.cpu(), self.pending)
        if reasons:
            return UpdateResult(False, reasons, 0, rows.numel(), math.nan)
        ns.write_(local_rows.reshape(-1), values)
        self.pending.setdefault(namespace, set()).update(rows.tolist())
        return UpdateResult(True, [], rows.numel(), rows.numel(), math.nan)

    def commit(self, meta: dict | None = None) -> int | None:
        """Snapshot the rows written since the last commit as a new store version."""
        if self.store is None:
            raise ValueError("this updater has no store; pass store=TableStore(path)")
        rows = sorted(r for s in self.pending.values() for r in s)
        v = self.store.commit(self.table.weight, torch.tensor(rows, dtype=torch.int64), meta)
        self.pending = {}
        return v
