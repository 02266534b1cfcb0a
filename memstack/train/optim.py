"""Parameter groups, the optimizer and the learning-rate schedule.

Every parameter belongs to a named group. Built in: "decay" (matrices) and "no_decay" (norms,
gains, biases: anything 1-D, and what a memory exempts, e.g. memory tokens). A memory puts
parameters into its own group by defining `optim_group(param_name) -> str | None` (the name is
relative to the memory module); `TrainConfig.groups[name]` then sets that group's learning-rate
scale, weight decay and optimizer -- how large sparse tables get their own learning rate.
A memory may give its groups defaults (`optim_defaults()`, e.g. Engram's tables: Adam at 5x
the base learning rate, no weight decay); `TrainConfig.groups` overrides them.

Groups whose optimizer is "adam" or "rowwise_adagrad" go to the row-sparse optimizer
(memory/sparse/row_optim.py), which takes sparse gradients; a parameter marked `sparse_grad` (table
rows, whose gradient is sparse) in an "adamw" group is refused with the fix.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from memstack.train.config import GroupConfig, TrainConfig


def assign_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Group name -> [(param name, param)], each parameter once (tied weights are one parameter)."""
    owner: dict[str, str] = {}
    stack = getattr(model, "memory", None)
    if stack is not None:
        for i, mem in enumerate(stack.memories):
            fn = getattr(mem, "optim_group", None)
            for name, _ in mem.named_parameters():
                g = fn(name) if fn else None
                if g:
                    owner[f"memory.memories.{i}.{name}"] = g
    groups: dict[str, list] = defaultdict(list)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        g = owner.get(name) or ("decay" if p.dim() >= 2 else "no_decay")
        groups[g].append((name, p))
    return dict(groups)


def apply_trainable(model: nn.Module, trainable: str) -> None:
    """`trainable="memory"`: freeze every parameter outside the memory stack (no gradient is
    computed for them); "all" leaves requires_grad as it is. Raises if nothing would train."""
    if trainable == "memory":
        for name, p in model.named_parameters():
            if not name.startswith("memory."):
                p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        from memstack.errors import ConfigError

        raise ConfigError(f"trainable={trainable!r} leaves no parameter to train "
                          "(the model's memories have no parameters)", what="train config")


def group_defaults(model: nn.Module) -> dict[str, GroupConfig]:
    """The memories' default settings of their own optimizer groups."""
    out: dict[str, GroupConfig] = {}
    stack = getattr(model, "memory", None)
    for mem in (stack.memories if stack is not None else []):
        fn = getattr(mem, "optim_defaults", None)
        out.update(fn() if fn else {})
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """torch.optim.AdamW over the dense groups; with row-sparse groups, a MultiOptimizer of
    AdamW and the row-sparse optimizer (same param_groups / state_dict interface)."""
    from memstack.errors import ConfigError
    from memstack.memory.sparse.row_optim import MultiOptimizer, RowSparseOptimizer

    defaults = group_defaults(model)
    dense, sparse, bad = [], [], []
    for gname, params in sorted(assign_groups(model).items()):
        gc = cfg.groups.get(gname) or defaults.get(gname) or GroupConfig()
        wd = gc.weight_decay if gc.weight_decay is not None else (cfg.weight_decay if gname == "decay" else 0.0)
        if gname not in ("decay", "no_decay") and gc.weight_decay is None:
            wd = 0.0  # a memory's own group defaults to no decay (tables, gates)
        g = {"params": [p for _, p in params], "names": [n for n, _ in params], "group": gname,
             "weight_decay": wd, "lr_scale": gc.lr_scale, "lr": cfg.lr * gc.lr_scale}
        if gc.optimizer == "adamw":
            bad += [f"groups.{gname}: {n} has sparse (row) gradients; set train.groups.{gname}.optimizer to adam or "
                    "rowwise_adagrad" for n, p in params if getattr(p, "sparse_grad", False)]
            dense.append(g)
        else:
            sparse.append({**g, "optimizer": gc.optimizer, "eps": gc.eps, "betas": cfg.betas})
    if bad:
        raise ConfigError(bad, what="optimizer groups")
    fused = None if not any(p.is_cuda for g in dense for p in g["params"]) else True
    opts = [torch.optim.AdamW(dense, lr=cfg.lr, betas=cfg.betas, fused=fused)] if dense else []
    if not sparse:
        return opts[0]
    opts.append(RowSparseOptimizer(sparse, lr=cfg.lr, betas=cfg.betas))
    return MultiOptimizer(opts)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
