"""Warm starts: the plain backbone trained once per (task, seed), cached, then shared by every
cell of a suite, so each memory is retrofitted onto a trained model -- the way memories are
added to pretrained language models -- instead of being learnt together with the backbone from
nothing in a few hundred steps.

`WarmStartConfig.task` changes fields of the task for the warm start's training only (e.g. a
long-context suite whose cells train on 128-1,024 tokens warm-starts on 256-token examples with
full attention over each).

`WarmStartConfig.seg_len` sets the window the plain backbone trains with. Set to the length of
a whole example (e.g. 128 for two 64-token segments), the backbone learns the task with full
attention over everything the example holds; a cell then runs it at the suite's shorter
`seg_len`, where only a memory can bring back what left the window. That full-attention model's
own metrics are recorded with the warm start, as the reference a memory can reach.

Cache: `<cache_dir>/bench-warm/<key>/`, a memstack checkpoint (safetensors, SHA-256 verified on
load) whose metadata holds the warm start's description. The key hashes everything that determines the weights: the backbone,
the task config, the SHA-256 of the task's data, the warm-start and training settings, the seed,
the memstack and torch versions and `WARM_FORMAT` (bumped when the training code changes what
it produces). A cached entry that fails verification is trained again and replaced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, Checked, ModelConfig, to_dict
from memstack.errors import CheckpointError
from memstack.evals.task import Task
from memstack.train.config import TrainConfig
from memstack.train.distributed import DistInfo

WARM_FORMAT = 1


@dataclass(frozen=True)
class WarmStartConfig(Checked):
    steps: int = 0                 # training steps of the plain backbone; 0 = no warm start
    seg_len: int | None = None     # its window; None = the suite's seg_len
    lr: float = 3e-3
    batch_size: int | None = None  # None = the suite's
    task: dict[str, Any] = field(default_factory=dict)   # task config fields changed for the warm start only

    def check(self) -> list[str]:
        r = []
        if "kind" in self.task:
            r.append("task: the warm start trains on the suite's task; `kind` cannot be changed")
        if self.steps < 0:
            r.append(f"steps must be >= 0, got {self.steps}")
        if self.seg_len is not None and self.seg_len < 1:
            r.append(f"seg_len must be >= 1 or null, got {self.seg_len}")
        if not self.lr > 0:
            r.append(f"lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            r.append(f"batch_size must be >= 1 or null, got {self.batch_size}")
        return r


@dataclass
class WarmStart:
    """A trained plain backbone: its weights (CPU tensors) and what describes it."""

    key: str
    weights: dict[str, torch.Tensor]
    meta: dict


def warm_cache_dir() -> Path:
    from memstack.data.assets import cache_dir

    return cache_dir() / "bench-warm"


def warm_key(backbone: BackboneConfig, task: Task, warm: WarmStartConfig, train: TrainConfig, seed: int,
             data_sha256: str) -> str:
    from memstack import __version__

    w = to_dict(warm)
    del w["task"]   # its changes are in the task config hashed below (the same task trains the same weights)
    doc = {"format": WARM_FORMAT, "backbone": to_dict(backbone), "task": to_dict(task.cfg), "data_sha256": data_sha256,
           "warm": w, "train": to_dict(train), "seed": seed, "memstack": __version__,
           "torch": torch.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _warm_train_config(train: TrainConfig, warm: WarmStartConfig, seed: int) -> TrainConfig:
    return dataclasses.replace(train, lr=warm.lr, max_steps=warm.steps, warmup_steps=max(1, warm.steps // 20),
                               batch_size=warm.batch_size or train.batch_size, eval_every=0, ckpt_every=0,
                               seed=seed, progress=False, curriculum=(), vary_segments=False)


def warm_task_config(task_cfg, warm: WarmStartConfig):
    """The task config the warm start trains on: the suite's with `warm.task`'s fields changed
    (validated like any config: unknown fields and bad values are refused with every reason)."""
    from memstack.config import from_dict

    if not warm.task:
        return task_cfg
    data = {k: v for k, v in to_dict(task_cfg).items() if k != "kind"}
    return from_dict(type(task_cfg), {**data, **warm.task}, what=f"warm_start task for {task_cfg.label}")


def warm_start(backbone: BackboneConfig, task_cfg, task: Task, warm: WarmStartConfig, train: TrainConfig, seed: int,
               device: torch.device, data_sha256: str, log=print, cache: bool = True) -> WarmStart:
    """The plain backbone of `backbone` trained `warm.steps` steps on the task (window
    `warm.seg_len`; the task's fields changed by `warm.task`), from the cache when present.
    `backbone.seg_len` is the suite's (cells load these weights at that length); the weights do
    not depend on it."""
    from memstack.checkpoint import load_backbone_weights
    from memstack.evals.task import build_task
    from memstack.memory.baseline import NoMemoryConfig
    from memstack.train.trainer import Trainer

    if warm.task:
        task_cfg = warm_task_config(task_cfg, warm)
        task = build_task(task_cfg, task.seg_len, task.layout_seg_len)
        data_sha256 = task.data_sha256()

    tcfg = _warm_train_config(train, warm, seed)
    key = warm_key(backbone, task, warm, tcfg, seed, data_sha256)
    root = warm_cache_dir() / key
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone, (NoMemoryConfig(),))).to(device)
    if cache and (root / "config.json").is_file():
        try:
            meta = dict(load_backbone_weights(model, root)["warm_start"])   # verified: weights and meta
            meta["cached"] = True
            return WarmStart(key, _backbone_tensors(model), meta)
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
            log(f"warm start {key}: cached copy unusable ({str(e).splitlines()[0]}); training it again")
    window = warm.seg_len or backbone.seg_len
    wtask = task if window == task.seg_len else build_task(task_cfg, window, task.layout_seg_len)
    trainer = Trainer(model, tcfg, wtask.train_source(tcfg.batch_size, seed), dist=DistInfo(device=device))
    t0 = time.perf_counter()
    rec = trainer.fit(progress=False)
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        ref = {split: wtask.evaluate_reference(model, split) for split in ("val", "test")}
    meta = {"key": key, "format": WARM_FORMAT, "steps": trainer.step, "train_tokens": trainer.tokens,
            "seg_len": window, "lr": warm.lr, "seed": seed, "train_loss": rec.get("loss"), "train_s": train_s,
            "metrics_val": ref["val"], "metrics": ref["test"], "data_sha256": data_sha256,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cache:
        _store(model, root, meta)
    meta["cached"] = False
    return WarmStart(key, _backbone_tensors(model), meta)


def _backbone_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("memory.")}


def _store(model: torch.nn.Module, root: Path, meta: dict) -> None:
    """Write the checkpoint under a temporary name and rename it into place: a crash leaves no
    half-written entry, and of two processes training the same key the first rename wins."""
    from memstack.checkpoint import save_checkpoint

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, meta={"warm_start": meta})     # the meta is checksummed with the weights
    if root.exists():   # an unusable entry (it failed to load): replace it
        shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:     # another process stored the same key meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


def load_warm(model: torch.nn.Module, warm: WarmStart) -> None:
    """Copy the warm start's backbone tensors into `model` (its memory parameters stay as built)."""
    params = model.state_dict()
    problems = [f"{k}: missing in the model" for k in warm.weights if k not in params]
    problems += [f"{k}: shape {tuple(params[k].shape)} in the model, {tuple(t.shape)} in the warm start"
                 for k, t in warm.weights.items() if k in params and params[k].shape != t.shape]
    if problems:
        raise CheckpointError("the warm start does not fit the model:\n" + "\n".join(f"  - {p}" for p in problems))
    with torch.no_grad():
        for k, t in warm.weights.items():
            params[k].copy_(t)
