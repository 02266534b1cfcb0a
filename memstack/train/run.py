"""A training run from one config: `memstack train` (and under torchrun, one per process).

    model:    BackboneConfig fields (vocab_size defaults to the task's vocabulary)
    pretrained: optional pretrained backbone -- a registered name (smollm2) or hf:<local HF dir>;
              its weights initialise the backbone and its architecture fills the omitted model
              fields (a given field that differs is refused); seg_len stays free
    memories: [{kind: xl, mem_len: 64}, ...]
    task:     {kind: lm, ...}
    train:    TrainConfig fields
    device:   auto | cpu | cuda
    out_dir:  where checkpoints and log.jsonl go
    init_from: a checkpoint (or training out_dir) whose backbone initialises the model; the
              memories start fresh (e.g. prefix-tuning a trained backbone with train.trainable: memory)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memstack.config import BackboneConfig, Checked, MemoryConfig, ModelConfig, from_dict, to_dict
from memstack.errors import CheckpointError
from memstack.evals.task import TaskConfig, build_task
from memstack.registry import validate_memories
from memstack.train.config import TrainConfig


@dataclass(frozen=True)
class RunConfig(Checked):
    model: BackboneConfig = field(default_factory=BackboneConfig)
    memories: tuple[MemoryConfig, ...] = ()
    task: TaskConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    out_dir: str | None = None
    init_from: str | None = None
    pretrained: str | None = None      # registered pretrained backbone (memstack.hf.pretrained) or hf:<dir>

    def check(self) -> list[str]:
        r = [] if self.task is not None else ["task is required, e.g. task: {kind: lm}"]
        if self.pretrained is not None:
            from memstack.hf.pretrained import PRETRAINED, mismatch_reasons

            if not self.pretrained.startswith("hf:") and self.pretrained not in PRETRAINED:
                r.append(f"pretrained: unknown backbone {self.pretrained!r}; valid: {', '.join(PRETRAINED)}, hf:<local dir>")
            else:
                r += mismatch_reasons(self.pretrained, self.model)
                want = PRETRAINED[self.pretrained].tokenizer if self.pretrained in PRETRAINED else None
                have = getattr(self.task, "tokenizer", None)
                if want and have is not None and have != want:
                    r.append(f"task.tokenizer is {have!r} but pretrained backbone {self.pretrained!r} reads {want!r} ids")
        if self.task is not None and self.model.vocab_size != self.task.vocab_size():
            r.append(f"model.vocab_size is {self.model.vocab_size} but task {self.task.kind!r} uses a vocabulary of "
                     f"{self.task.vocab_size()} (omit model.vocab_size to take the task's)")
        r += validate_memories(self.model, self.memories)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            r.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return r

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.model, self.memories)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """RunConfig from YAML data; `model.vocab_size` is taken from the task when omitted."""
    data = dict(data)
    model = dict(data.get("model") or {})
    name = data.get("pretrained")
    if isinstance(name, str):
        from dataclasses import asdict

        from memstack.hf.pretrained import PRETRAINED, pretrained_backbone

        if name in PRETRAINED or name.startswith("hf:"):
            # the architecture is the pretrained one; fields given in `model` are checked against it
            model = {**asdict(pretrained_backbone(name)), **model}
    if "vocab_size" not in model and isinstance(data.get("task"), dict):
        try:
            task = from_dict(TaskConfig, data["task"], what="task config")
            model["vocab_size"] = task.vocab_size()
        except Exception:  # the full parse below reports the task's problems
            pass
    data["model"] = model
    return from_dict(RunConfig, data, what="run config")


def run_training(cfg: RunConfig, resume: str | Path | None = None, progress: bool = True) -> dict:
    """Train (data-parallel under torchrun), checkpoint to out_dir, return the final record."""
    from memstack.backbone.model import build_model
    from memstack.train.distributed import barrier, init_distributed, shutdown
    from memstack.train.trainer import Trainer

    dist = init_distributed(cfg.device)
    trainer = None
    try:
        task = build_task(cfg.task, cfg.model.seg_len)
        torch.manual_seed(cfg.train.seed)
        if cfg.pretrained:
            from memstack.hf.pretrained import load_pretrained

            model = load_pretrained(cfg.pretrained, cfg.memories, seg_len=cfg.model.seg_len).to(dist.device)
        else:
            model = build_model(cfg.model_config()).to(dist.device)
        if cfg.init_from:
            from memstack.checkpoint import load_backbone_weights

            load_backbone_weights(model, latest_checkpoint(cfg.init_from))
        if cfg.train.batch_size % dist.world:
            raise ValueError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the {dist.world} processes")
        source = task.train_source(cfg.train.batch_size, cfg.train.seed, dist.rank, dist.world)
        meta = {"task": to_dict(cfg.task), "train": to_dict(cfg.train)}
        if cfg.init_from:
            meta["init_from"] = str(cfg.init_from)
        tok = getattr(task, "tokenizer", None)
        if tok is not None:
            meta.update(tokenizer=tok.name, tokenizer_fingerprint=tok.fingerprint())
        # row-sharded tables answer lookups collectively: every rank runs the (identical) evaluation
        evaluate = task.evaluate if dist.is_main or cfg.train.shard_tables else None
        trainer = Trainer(model, cfg.train, source, out_dir=cfg.out_dir, evaluate=evaluate, dist=dist, meta=meta)
        if resume:
            trainer.resume(resume)
        rec = trainer.fit(progress=progress)
        rec["params"] = model.num_params()
        barrier(dist)                 # every rank is done communicating (rank 0 saved last) before any tears down
        return rec
    finally:
        if trainer is not None:
            trainer.close()           # the process group is released here, not at interpreter exit
        shutdown(dist)


def latest_checkpoint(path: str | Path) -> Path:
    """A model checkpoint directory: `path` itself, or the latest step under a trainer's ckpt dir."""
    from memstack.train.trainer import resolve_step_dir

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    for p in (path, path / "ckpt"):
        if (p / "trainer.json").is_file() or (p / "latest").is_file() or any(p.glob("step-*")):
            return resolve_step_dir(p)       # a damaged pointer or step is an error, never skipped
    raise CheckpointError(f"no checkpoint found at {path} (expected config.json, or a trainer 'latest' pointer)")


def load_for_inference(path: str | Path, device: str = "auto"):
    """(model, meta, tokenizer or None) from a checkpoint; refuses a tokenizer that changed."""
    from memstack.checkpoint import load_checkpoint
    from memstack.train.distributed import resolve_device

    ckpt = latest_checkpoint(path)
    model, meta = load_checkpoint(ckpt, device=resolve_device(device))
    tokenizer = None
    if meta.get("tokenizer"):
        from memstack.data.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(meta["tokenizer"])
        if meta.get("tokenizer_fingerprint") and tokenizer.fingerprint() != meta["tokenizer_fingerprint"]:
            raise CheckpointError(f"{ckpt} was trained with tokenizer {meta['tokenizer']} fingerprint "
                                  f"{meta['tokenizer_fingerprint']}, but the local one is {tokenizer.fingerprint()}")
    return model, meta, tokenizer


def evaluate_checkpoint(path: str | Path, task_cfg: TaskConfig | None = None, device: str = "auto",
                        ablate: bool = False) -> dict:
    """The task's metrics for a checkpoint. With `ablate`, {"metrics", "ablated", "ablation", "delta"}:
    also the metrics with every memory switched off (memstack/evals/ablation.py)."""
    model, meta, _ = load_for_inference(path, device)
    if task_cfg is None:
        if "task" not in meta:
            raise CheckpointError(f"{path} records no task; pass one with --task")
        task_cfg = from_dict(TaskConfig, meta["task"], what="stored task config")
    if task_cfg.vocab_size() != model.cfg.backbone.vocab_size:
        raise ValueError(f"task {task_cfg.kind} uses a vocabulary of {task_cfg.vocab_size()}, the model has "
                         f"{model.cfg.backbone.vocab_size}")
    task = build_task(task_cfg, model.cfg.backbone.seg_len)
    model.eval()
    if ablate:
        from memstack.evals.ablation import evaluate_with_ablation

        return evaluate_with_ablation(task, model)
    return task.evaluate(model)


__all__ = ["RunConfig", "run_config_from_dict", "run_training", "latest_checkpoint", "load_for_inference",
           "evaluate_checkpoint"]
