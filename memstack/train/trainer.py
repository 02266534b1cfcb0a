"""The trainer: AdamW with warmup + cosine, gradient clipping, bf16 autocast on GPU, the segment
loop with its BPTT policy and curriculum, checkpoint/resume, progress bars and JSONL logs, and
data parallelism (DDP) when launched with torchrun.

A data source is any object with `next(n_segments) -> Batch`, `state_dict()` and
`load_state_dict()` (see data/packing.py). The memory state carried between steps is part of
the trainer's state and is checkpointed with it, so a resumed run continues bit for bit.

Checkpoints: `<dir>/step-XXXXXXX/` is written in full under a temporary name and renamed, then
`<dir>/latest` is replaced atomically; a crash mid-save leaves the previous checkpoint intact.
Every document is sealed (memstack/atomic.py) and signs what it names: `latest` records the
checksum of the step's trainer.json, which records the SHA-256 of optim.safetensors and the
checksums of the model's config.json and of the carried state's manifest.
"""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from memstack.atomic import read_sealed, sha256_file, write_sealed
from memstack.checkpoint import load_weights, save_checkpoint
from memstack.config import to_dict
from memstack.data.packing import Batch
from memstack.errors import CheckpointError
from memstack.memory.state import ModelState, detach, load_state, save_state, tree_map
from memstack.train.config import TrainConfig
from memstack.train.distributed import DistInfo, all_reduce_sum
from memstack.train.optim import apply_trainable, build_optimizer, lr_at, set_lr
from memstack.memory.sparse.row_optim import grad_norm_and_clip
from memstack.train.segments import SegmentLoop

TRAINER_FORMAT = 2
TRAINER_KIND, LATEST_KIND = "memstack-trainer-state", "memstack-trainer-latest"
_TRAINER_FIELDS = {"step": int, "tokens": int, "target_tokens": int, "train": dict, "source": dict, "param_groups": list,
                   "has_state": bool, "world": int, "optim_sha256": str, "config": str, "carry": (str, type(None))}


class Source(Protocol):
    def next(self, n_segments: int) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, d: dict) -> None: ...


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, source: Source, *, out_dir: str | Path | None = None,
                 evaluate: Callable[[nn.Module], dict] | None = None, dist: DistInfo | None = None,
                 meta: dict | None = None):
        self.model, self.cfg, self.source, self.evaluate = model, cfg, source, evaluate
        self.dist = dist or DistInfo(device=model.device)
        self.out_dir = Path(out_dir) if out_dir else None
        self.meta = meta or {}
        apply_trainable(model, cfg.trainable)
        self.sharded: list[str] = []
        if cfg.shard_tables and self.dist.world > 1:  # row-wise table shards, one block per process
            from memstack.memory.sparse.shard import shard_tables

            self.sharded = shard_tables(model, self.dist.rank, self.dist.world)
        self.opt = build_optimizer(model, cfg)
        loop = SegmentLoop(model)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.sharded:  # each rank owns different rows: not DDP's to average
                DDP._set_params_and_buffers_to_ignore_for_model(loop, [f"model.{n}" for n in self.sharded])
            loop = DDP(loop, device_ids=[self.dist.local_rank] if self.dist.device.type == "cuda" else None)
        self.loop = loop
        self.step = 0
        self.tokens = 0             # input tokens processed, all ranks
        self.target_tokens = 0      # tokens with a loss, all ranks
        self.train_time = 0.0       # seconds spent in training steps (this process, since start/resume)
        self.state: ModelState | None = None
        self.history: list[dict] = []
        self._log_file = None

    # ------------------------------------------------------------------------------- training
    def train_step(self) -> dict:
        cfg, dev = self.cfg, self.dist.device
        n_seg = cfg.segments_for(self.step)
        batch = self.source.next(n_seg).to(dev)
        B = batch.tokens.shape[0]
        if self.state is None or self.state.batch_size != B:
            self.state = self.model.init_state(B, dev)
        count = all_reduce_sum(torch.tensor(float(batch.n_targets), device=dev), self.dist)
        # sum of token losses / global count, times world: DDP's gradient *average* then equals
        # the gradient of the mean token loss over the global batch, exactly as one process would
        scale = self.dist.world / max(float(count), 1.0)
        lr = lr_at(self.step, cfg)
        set_lr(self.opt, lr)
        t0 = time.perf_counter()
        self.model.train()
        with autocast_for(dev, cfg.precision):
            loss, total, state = self.loop(batch, self.state, cfg.bptt, cfg.bptt_k, scale)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if any(p.grad is not None and (p.grad.is_sparse or getattr(p, "sharded", False)) for p in params):
            gnorm = grad_norm_and_clip(params, cfg.grad_clip, self._sharded_sq)  # sparse / sharded rows
        elif cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.opt.step()
        self.state = detach(state)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        total = all_reduce_sum(total, self.dist)
        n_tok = B * batch.tokens.shape[1] * batch.tokens.shape[2] * self.dist.world
        self.step += 1
        self.train_time += dt
        self.tokens += n_tok
        self.target_tokens += int(count)
        return {"step": self.step, "loss": float(total) / max(float(count), 1.0), "lr": lr, "grad_norm": float(gnorm),
                "segments": n_seg, "tokens": self.tokens, "target_tokens": self.target_tokens,
                "tok_per_s": n_tok / dt, "step_s": dt}

    def _sharded_sq(self, local_sq: torch.Tensor) -> torch.Tensor:
        """Sum over processes of the squared gradient norms of rank-local (row-sharded) parameters."""
        return all_reduce_sum(local_sq, self.dist)

    def done(self) -> bool:
        cfg = self.cfg
        return self.step >= cfg.max_steps or (cfg.max_tokens is not None and self.target_tokens >= cfg.max_tokens)

    def fit(self, progress: bool | None = None) -> dict:
        """Train until max_steps / max_tokens; returns the last log record (with final eval)."""
        cfg, main = self.cfg, self.dist.is_main
        show = (cfg.progress if progress is None else progress) and main
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        rec: dict[str, Any] = {}
        t_start = time.perf_counter()
        try:
            while not self.done():
                rec = self.train_step()
                rec["elapsed_s"] = time.perf_counter() - t_start
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
                last = self.done()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.evaluate and not last:
                    rec["eval"] = self._eval()
                if (self.step % max(cfg.log_every, 1) == 0 or "eval" in rec) and not last:
                    self._log(rec)  # the last step is logged once, below, with the final evaluation
                if cfg.ckpt_every and self.out_dir and self.step % cfg.ckpt_every == 0 and not last:
                    self.save(self.out_dir / "ckpt")
        finally:
            if bar:
                bar.close()
        if self.evaluate:
            rec["eval"] = self._eval()
        if rec:
            self._log(rec)
        if self.out_dir:
            self.save(self.out_dir / "ckpt")
        return rec

    def close(self) -> None:
        """Drop the data-parallel wrapper now, while the interpreter is fully alive. Its reducer
        holds the process group and the last step's communication work; left to interpreter exit,
        destroying gloo's pending work aborts the process ("terminate called without an active
        exception", SIGABRT) -- after a run that succeeded, on whichever rank exits first."""
        self.loop = None
        gc.collect()

    def _eval(self) -> dict:
        self.model.eval()
        try:
            with torch.no_grad(), autocast_for(self.dist.device, self.cfg.precision):
                return self.evaluate(self.model)
        finally:
            self.model.train()

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if not (self.out_dir and self.dist.is_main):
            return
        if self._log_file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.out_dir / "log.jsonl", "a")
        self._log_file.write(json.dumps(rec) + "\n")
        self._log_file.flush()

    # ------------------------------------------------------------------------------- checkpoints
    def save(self, root: str | Path) -> Path | None:
        """Write a resumable checkpoint under root/step-XXXXXXX. Every process must call it (the
        carried memory state is gathered from all ranks); the main process writes."""
        state = self._gather_state()
        root = Path(root)
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}-{os.getpid()}"
        if self.sharded:  # every rank writes its table rows (and their optimizer state) into tmp
            tmp = self._sharded_save(root, tmp)
        if not self.dist.is_main:
            return None
        if not self.sharded:
            root.mkdir(parents=True, exist_ok=True)
            clean_step_leftovers(root)             # left by a crash during an earlier save
            shutil.rmtree(tmp, ignore_errors=True)  # ... or by a save of this process that raised
            tmp.mkdir()
        save_checkpoint(self.model, tmp, meta=self.meta)
        from safetensors.torch import save_file

        flat, groups = _flatten_optimizer(self.opt.state_dict(), self._shard_pids())
        flat["rng.torch"] = torch.get_rng_state()
        save_file(flat, str(tmp / "optim.safetensors"))
        carry = save_state(state, tmp / "carry", self.model.memory.kinds) if state is not None else None
        trainer_sum = write_sealed(tmp / "trainer.json", TRAINER_KIND, TRAINER_FORMAT, {
            "step": self.step, "tokens": self.tokens, "target_tokens": self.target_tokens,
            "train": to_dict(self.cfg), "source": self.source.state_dict(), "param_groups": groups,
            "has_state": state is not None, "world": self.dist.world, "optim_sha256": sha256_file(tmp / "optim.safetensors"),
            "config": read_sealed(tmp / "config.json", "memstack-checkpoint", 2)["checksum"], "carry": carry})
        old = None
        if final.exists():  # saving the same step again: move the old copy aside, never delete first
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        write_sealed(root / "latest", LATEST_KIND, TRAINER_FORMAT, {"step": final.name, "trainer": trainer_sum})
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for stale in sorted(root.glob("step-*"))[:-2]:  # keep the last two
            gone = root / f".old-{stale.name}-{os.getpid()}"
            os.replace(stale, gone)                     # renamed first: a crash mid-delete leaves no half step
            shutil.rmtree(gone, ignore_errors=True)
        return final

    def _shard_pids(self) -> set[int]:
        """Optimizer state ids of the row-sharded parameters (their state is saved in shards)."""
        names = set(self.sharded)
        order = [p for g in self.opt.param_groups for p in g["params"]]
        by_name = {id(p): n for n, p in self.model.named_parameters()}
        return {i for i, p in enumerate(order) if by_name.get(id(p)) in names}

    def _sharded_save(self, root: Path, tmp: Path) -> Path:
        """All ranks: agree on one temporary directory, write this rank's shards (rows and their
        optimizer state) into it, wait for each other; rank 0 then indexes them."""
        import torch.distributed as tdist

        from memstack.memory.sparse.shard import write_shard_index, write_shards, write_state_shards

        if self.dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            clean_step_leftovers(root)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        box = [str(tmp)]
        tdist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        write_shards(self.model, tmp)
        write_state_shards(self.model, self.opt, tmp)
        tdist.barrier()
        if self.dist.is_main:
            write_shard_index(self.model, tmp)
        return tmp

    def _gather_state(self) -> ModelState | None:
        """The carried state of the global batch: every rank's rows, in rank order (state tensors
        are batch-first by convention, see memory/base.py)."""
        if self.state is None or self.dist.world == 1:
            return self.state
        import torch.distributed as tdist

        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(self.dist.world)]
            tdist.all_gather(parts, t.contiguous())
            return torch.cat(parts, 0)

        return tree_map(gather, self.state)

    def resume(self, path: str | Path) -> None:
        """Restore model, optimizer, carried memory state, data position and counters."""
        from safetensors.torch import load_file

        path = Path(path)
        if (path / "latest").is_file():
            clean_step_leftovers(path)             # a crashed save's directories, on the next open
        path = resolve_step_dir(path)
        meta = trainer_manifest(path)
        if read_sealed(path / "config.json", "memstack-checkpoint", 2)["checksum"] != meta["config"]:
            raise CheckpointError(f"{path / 'config.json'} is not the model config its trainer.json recorded")
        if not (path / "optim.safetensors").is_file() or sha256_file(path / "optim.safetensors") != meta["optim_sha256"]:
            raise CheckpointError(f"{path / 'optim.safetensors'}: missing or checksum mismatch -- the optimizer state is "
                                  "corrupted")
        load_weights(self.model, path)
        flat = load_file(str(path / "optim.safetensors"))
        torch.set_rng_state(flat.pop("rng.torch"))
        osd = _unflatten_optimizer(flat, meta["param_groups"], self.dist.device)
        if self.sharded and not (path / "shards").is_dir():   # unsharded checkpoint, sharded run: slice rows
            mods = {n: m for n, m in self.model.named_modules() if getattr(m, "shard", None)}
            order = [p for g in self.opt.param_groups for p in g["params"]]
            for pid in self._shard_pids():
                mod = next(m for m in mods.values() if m.weight is order[pid])
                _, _, lo, hi = mod.shard
                for k, t in osd["state"].get(pid, {}).items():
                    if t.dim() and t.shape[0] == mod.n_rows:
                        osd["state"][pid][k] = t[lo:hi].clone()
        self.opt.load_state_dict(osd)
        if self.sharded or (path / "shards").is_dir():
            from memstack.memory.sparse.shard import load_state_shards

            load_state_shards(self.model, self.opt, path)
        self.state = None
        if meta["has_state"]:
            state = load_state(path / "carry", self.model.memory.kinds, self.dist.device, expect=meta["carry"])
            B = state.batch_size // self.dist.world  # this rank's rows of the global batch
            self.state = tree_map(lambda t: t[self.dist.rank * B:(self.dist.rank + 1) * B], state)
        self.source.load_state_dict(meta["source"])
        self.step, self.tokens, self.target_tokens = meta["step"], meta["tokens"], meta["target_tokens"]


def clean_step_leftovers(root: Path) -> list[Path]:
    """Remove what a save left when its process died: `.tmp-step-*-<pid>` / `.old-step-*-<pid>`
    directories and temporary files of dead writers (a live writer's are kept), and step
    directories newer than the one `latest` names -- a step exists once `latest` says so (a save
    killed between publishing the directory and moving `latest`). Returns what was removed."""
    from memstack.atomic import _alive, clean_temporaries

    removed = clean_temporaries(root) if root.is_dir() else []
    for d in list(root.glob(".tmp-step-*-*")) + list(root.glob(".old-step-*-*")):
        pid = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    try:
        named = read_sealed(root / "latest", LATEST_KIND, TRAINER_FORMAT, {"step": str})["step"]
    except CheckpointError:
        return removed                              # no readable pointer: leave every step alone
    for d in root.glob("step-*"):
        if d.is_dir() and d.name > named:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def trainer_manifest(path: Path) -> dict:
    """The verified trainer.json of step directory `path`."""
    tj = path / "trainer.json"
    if not tj.is_file():
        raise CheckpointError(f"{path} is not a trainer checkpoint (no trainer.json)")
    return read_sealed(tj, TRAINER_KIND, TRAINER_FORMAT, _TRAINER_FIELDS,
                       older=f"run `memstack migrate {path}` to verify it and add the checksums")


def resolve_step_dir(path: Path) -> Path:
    """A trainer checkpoint dir: `path` itself, or what `path/latest` names (verified: `latest`
    signs the step's trainer.json); if `latest` names a directory that is gone, the newest
    complete step-* directory. A corrupted `latest` is an error, never skipped."""
    if (path / "trainer.json").is_file():
        return path
    if (path / "latest").is_file():
        if re.fullmatch(r"step-\d+\s*", (path / "latest").read_text(errors="replace")):
            raise CheckpointError(f"{path / 'latest'} was written by an older memstack without checksums: run "
                                  f"`memstack migrate {path}` to verify the checkpoint and add them")
        doc = read_sealed(path / "latest", LATEST_KIND, TRAINER_FORMAT, {"step": str, "trainer": str},
                          older=f"run `memstack migrate {path}` to verify it and add the checksums")
        named = path / doc["step"]
        if not named.name.startswith("step-") or named.parent != path:
            raise CheckpointError(f"{path / 'latest'} names {doc['step']!r}, not a step of this directory")
        if (named / "trainer.json").is_file():
            if trainer_manifest(named)["checksum"] != doc["trainer"]:
                raise CheckpointError(f"{named / 'trainer.json'} is not the one {path / 'latest'} recorded (replaced?)")
            return named
    steps = [p for p in sorted(path.glob("step-*")) if (p / "trainer.json").is_file()]
    if steps:
        return steps[-1]
    raise CheckpointError(f"{path} is not a trainer checkpoint (no trainer.json, no complete step-* directory)")


def _flatten_optimizer(sd: dict, skip: set[int] = frozenset()) -> tuple[dict[str, torch.Tensor], list[dict]]:
    flat = {}
    for pid, st in sd["state"].items():
        if pid in skip:  # row-sharded parameters: their state is saved by their ranks
            continue
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            flat[f"state.{pid}.{k}"] = t.detach().contiguous().cpu()
    return flat, sd["param_groups"]


def _unflatten_optimizer(flat: dict[str, torch.Tensor], groups: list[dict], device: torch.device) -> dict:
    state: dict[int, dict] = {}
    for key, t in flat.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t if name == "step" else t.to(device)
    return {"state": state, "param_groups": groups}
