"""Row-sparse optimizers: they accept sparse (COO) gradients and update only the rows a step
touched -- never a dense gradient of a large table, never a pass over untouched rows.

A "row" is a slice along dim 0 (a table row; for a 1-D parameter, one element).

- "adam": lazy Adam. Per touched row: m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, with the
  bias correction of *that row's* step count (one int per row), then decoupled weight decay
  on the touched rows. torch.optim.SparseAdam corrects with the parameter's global step
  instead, which shrinks the first updates of rarely touched rows by ~(1 - b1) -- the Zipfian
  tail of a hashed table would then barely learn. State: m, v (like the weight) + steps (rows).
- "rowwise_adagrad": FBGEMM's EXACT_ROWWISE_ADAGRAD. Per touched row r with gradient g_r (D,):
  G_r <- G_r + mean(g_r^2);  w_r <- w_r - lr * g_r / (sqrt(G_r) + eps); L2 weight decay is
  added to g_r. State: one fp32 scalar per row (memory / D of Adam's).

Duplicate rows of a sparse gradient are summed first ("exact"). The per-row math is exposed as
pure functions (`adam_rows`, `adagrad_rows`) so that online updates (memory/sparse/online.py)
can compute a proposed update, check it against a safety policy, and only then write it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def adam_rows(w: Tensor, g: Tensor, m: Tensor, v: Tensor, steps: Tensor, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Lazy Adam on gathered rows: w, g, m, v (N, ...) and steps (N,) -> (w, m, v, steps), new tensors."""
    b1, b2 = betas
    g = g.to(m.dtype)
    m = m * b1 + g * (1 - b1)
    v = v * b2 + g * g * (1 - b2)
    steps = steps + 1
    shape = (-1,) + (1,) * (w.dim() - 1)
    c1 = (1 - b1 ** steps.to(m.dtype)).view(shape)                    # per-row bias corrections
    c2 = (1 - b2 ** steps.to(m.dtype)).view(shape)
    upd = (m / c1) / ((v / c2).sqrt() + eps)
    new = w * (1 - lr * weight_decay) - lr * upd.to(w.dtype)
    return new, m, v, steps


def adagrad_rows(w: Tensor, g: Tensor, acc: Tensor, lr: float, eps: float, weight_decay: float) -> tuple[Tensor, Tensor]:
    """Row-wise Adagrad on gathered rows: w, g (N, ...), acc (N,) -> (w, acc), new tensors."""
    g = g.float()
    if weight_decay:
        g = g + weight_decay * w.float()
    acc = acc + g.pow(2).reshape(g.shape[0], -1).mean(dim=1)
    shape = (-1,) + (1,) * (w.dim() - 1)
    new = w - (lr * g / (acc.sqrt().view(shape) + eps)).to(w.dtype)
    return new, acc


def touched(grad: Tensor) -> tuple[Tensor | None, Tensor]:
    """(rows (N,) or None for every row, their summed gradients (N, ...)) of a gradient."""
    if grad.is_sparse:
        g = grad.coalesce()
        return g.indices()[0], g.values()
    return None, grad


class RowSparseOptimizer(torch.optim.Optimizer):
    """Lazy Adam / row-wise Adagrad per group (`group["optimizer"]`); see the module docstring."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, optimizer: str = "adam"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optimizer=optimizer))
        for g in self.param_groups:
            if g["optimizer"] not in ("adam", "rowwise_adagrad"):
                raise ValueError(f"RowSparseOptimizer runs adam or rowwise_adagrad, not {g['optimizer']!r}")

    def init_state(self, p: Tensor, algo: str) -> dict:
        st = self.state[p]
        if not st:
            if algo == "adam":
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
            else:
                st["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        return st

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            algo = group["optimizer"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = touched(p.grad)
                if rows is not None and rows.numel() == 0:
                    continue
                st = self.init_state(p, algo)
                sel = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
                if algo == "adam":
                    new, m, v, steps = adam_rows(sel(p), g, sel(st["exp_avg"]), sel(st["exp_avg_sq"]), sel(st["row_step"]),
                                                 group["lr"], group["betas"], group["eps"], group["weight_decay"])
                    self._put(p, rows, new)
                    self._put(st["exp_avg"], rows, m)
                    self._put(st["exp_avg_sq"], rows, v)
                    self._put(st["row_step"], rows, steps)
                else:
                    new, acc = adagrad_rows(sel(p), g, sel(st["sum"]), group["lr"], group["eps"], group["weight_decay"])
                    self._put(p, rows, new)
                    self._put(st["sum"], rows, acc)
        return loss

    @staticmethod
    def _put(t: Tensor, rows: Tensor | None, values: Tensor) -> None:
        if rows is None:
            t.copy_(values)
        else:
            t.index_copy_(0, rows, values.to(t.dtype))


class MultiOptimizer:
    """Several optimizers driven as one (dense AdamW groups + row-sparse groups). Exposes what
    the trainer uses: param_groups (the children's group dicts, in order), zero_grad, step,
    state_dict / load_state_dict (one flat numbering of parameters, as a single optimizer has)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict:
        state, groups, base = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            n = sum(len(g["params"]) for g in sd["param_groups"])
            for pid, st in sd["state"].items():
                state[pid + base] = st
            for g in sd["param_groups"]:
                groups.append({**g, "params": [pid + base for pid in g["params"]]})
            base += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups, base = list(sd["param_groups"]), 0
        for o in self.optimizers:
            k = len(o.param_groups)
            mine, groups = groups[:k], groups[k:]
            n = sum(len(g["params"]) for g in mine)
            ids = {pid for g in mine for pid in g["params"]}
            o.load_state_dict({"state": {pid - base: st for pid, st in sd["state"].items() if pid in ids},
                               "param_groups": [{**g, "params": [pid - base for pid in g["params"]]} for g in mine]})
            base += n


def grad_norm_and_clip(params: list[Tensor], max_norm: float, sharded_sq: "callable | None" = None) -> Tensor:
    """Global L2 norm of the gradients (dense and sparse alike: sparse ones are coalesced, so a
    duplicated row counts once, summed), and, with max_norm > 0, scaling every gradient so the
    norm is at most max_norm -- torch.nn.utils.clip_grad_norm_'s rule, which cannot take sparse
    gradients. `sharded_sq(local_sq_sum) -> global` sums the squares of rank-local (sharded)
    gradients over the processes; those parameters carry `p.sharded = True`."""
    dense_sq, shard_sq = [], []
    device = None
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sq = p.grad.values().float().pow(2).sum()
        else:
            sq = p.grad.float().pow(2).sum()
        device = device or sq.device
        (shard_sq if getattr(p, "sharded", False) else dense_sq).append(sq.to(device))
    if device is None:
        return torch.zeros(())
    total = torch.stack(dense_sq).sum() if dense_sq else torch.zeros((), device=device)
    if shard_sq or sharded_sq is not None:
        local = torch.stack(shard_sq).sum() if shard_sq else torch.zeros((), device=device)
        total = total + (sharded_sq(local) if sharded_sq is not None else local)
    norm = total.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return norm
