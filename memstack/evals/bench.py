"""The equal-budget harness behind `memstack bench`.

A suite trains every selected memory on the same backbone, with the same token budget per
(memory, task, learning rate) cell, for every task; it reports the best learning rate of the
sweep per (memory, task), as Zoology does. Each cell writes one JSON record (config, git SHA,
device, versions, tokens/s, peak memory, state size, metrics).

Budget: `tokens_per_cell` input tokens per cell. With `time_budget_s`, the harness first
measures the plain backbone's training speed and, if the whole suite would not fit, shrinks
the per-cell budget -- by the same factor for every memory, so the comparison stays fair as
more memories are registered. The scaling is recorded in every record.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, Checked, MemoryConfig, ModelConfig, from_dict, to_dict
from memstack.errors import ConfigError
from memstack.evals.task import Task, TaskConfig, build_task
from memstack.registry import MEMORIES
from memstack.train.config import TrainConfig
from memstack.train.distributed import DistInfo, resolve_device
from memstack.train.trainer import Trainer


@dataclass(frozen=True)
class SuiteConfig(Checked):
    name: str = "custom"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)   # vocab_size is set per task
    memories: tuple[str, ...] = ("all",)           # registry names; "all" = every registered memory
    exclude: tuple[str, ...] = ()
    memory_configs: dict[str, dict] = field(default_factory=dict)      # kind -> config fields for the suite
    tasks: tuple[TaskConfig, ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)             # lr and max_steps are set per cell
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    tokens_per_cell: int = 1_000_000
    time_budget_s: float | None = None
    warmup_frac: float = 0.05
    device: str = "auto"
    seed: int = 0
    # also evaluate each trained cell with its memory switched off (evals/ablation.py); the
    # ablated metrics go into `metrics_ablated` (this evaluation is not in the time budget)
    ablate: bool = False

    def check(self) -> list[str]:
        r = []
        if not self.tasks:
            r.append("a suite needs at least one task")
        if not self.lrs or min(self.lrs) <= 0:
            r.append(f"lrs must be a non-empty list of positive learning rates, got {list(self.lrs)}")
        if self.tokens_per_cell < 1:
            r.append(f"tokens_per_cell must be >= 1, got {self.tokens_per_cell}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            r.append(f"time_budget_s must be > 0 or null, got {self.time_budget_s}")
        names = sorted(MEMORIES.names())
        r += [f"memories: unknown memory {m!r}; valid: {', '.join(names)}" for m in self.memories if m not in names + ["all"]]
        r += [f"exclude: unknown memory {m!r}; valid: {', '.join(names)}" for m in self.exclude if m not in names]
        r += [f"memory_configs: unknown memory {m!r}; valid: {', '.join(names)}" for m in self.memory_configs if m not in names]
        if not r:
            try:
                from memstack.registry import validate_memories

                for m in self.memory_list():
                    r += validate_memories(self.backbone, [m])
            except ConfigError as e:
                r += [f"memory_configs: {x}" for x in e.reasons]
        return r

    def memory_list(self) -> list[MemoryConfig]:
        names = MEMORIES.names() if "all" in self.memories else list(self.memories)
        out = []
        for n in names:
            if n in self.exclude:
                continue
            out.append(from_dict(MEMORIES.config_class(n), dict(self.memory_configs.get(n, {})), what=f"{n} config"))
        return out


# ------------------------------------------------------------------------------------ provenance

def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import numpy

    from memstack import __version__

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"device": dev, "device_type": device.type, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "memstack": __version__, "git_sha": git_sha(), "platform": platform.platform()}


class PeakMemory:
    """Peak memory of a block of work: CUDA allocator peak, or the process's peak RSS on CPU
    (Linux: the high-water mark is reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_mb = self.read()

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ cells

def _tokens_per_step(suite: SuiteConfig, task: Task, source: Any) -> int:
    n_seg = getattr(source, "n_segments", None) or suite.train.n_segments
    return suite.train.batch_size * n_seg * suite.backbone.seg_len


def cell_model(suite: SuiteConfig, task_cfg: TaskConfig, mem: MemoryConfig, device: torch.device):
    """The suite's backbone sized for the task's vocabulary, with one memory, initialised from the
    suite's seed (so every memory starts from the same backbone weights)."""
    backbone = dataclasses.replace(suite.backbone, vocab_size=task_cfg.vocab_size())
    torch.manual_seed(suite.seed)
    return build_model(ModelConfig(backbone, (mem,))).to(device)


def run_cell(suite: SuiteConfig, mem: MemoryConfig, task_cfg: TaskConfig, lr: float, tokens: int,
             device: torch.device, env: dict, task: Task | None = None) -> dict:
    """Train one memory on one task at one learning rate for `tokens` input tokens; evaluate."""
    task = task or build_task(task_cfg, suite.backbone.seg_len)
    model = cell_model(suite, task_cfg, mem, device)
    backbone = model.cfg.backbone
    source = task.train_source(suite.train.batch_size, suite.seed)
    per_step = _tokens_per_step(suite, task, source)
    steps = max(1, tokens // per_step)
    tcfg = dataclasses.replace(suite.train, lr=lr, max_steps=steps, warmup_steps=max(1, int(steps * suite.warmup_frac)),
                               eval_every=0, ckpt_every=0, progress=False)
    trainer = Trainer(model, tcfg, source, evaluate=task.evaluate, dist=DistInfo(device=device))
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        rec = trainer.fit(progress=False)
    wall = time.perf_counter() - t0
    ablation = {}
    if suite.ablate:
        from memstack.evals.ablation import ablated

        off = ablated(model.eval())
        with torch.no_grad():
            ablation = {"metrics_ablated": task.evaluate(off), "ablation": off.ablation}
    ctx_tokens = task_cfg.context_tokens() or (getattr(task_cfg, "num_pairs", 0) + 1) * backbone.seg_len
    return {
        "suite": suite.name, "memory": mem.kind, "task": task_cfg.label, "lr": lr, "seed": suite.seed,
        "metrics": rec.get("eval", {}), "primary": task.primary, "higher_is_better": task.higher_is_better,
        "train_loss": rec.get("loss"), "steps": trainer.step, "train_tokens": trainer.tokens,
        "tok_per_s": trainer.tokens / max(trainer.train_time, 1e-9),
        "wall_s": wall, "peak_mem_mb": peak.peak_mb, "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "params": model.num_params(), "memory_params": sum(p.numel() for p in model.memory.parameters()),
        "state_size": model.memory.state_size(ctx_tokens), "state_size_at_tokens": ctx_tokens,
        "state_bytes": model.memory.state_bytes(ctx_tokens),
        "config": {"backbone": to_dict(backbone), "memory": to_dict(mem), "task": to_dict(task_cfg), "train": to_dict(tcfg)},
        **ablation, **env,
    }


def calibrate(suite: SuiteConfig, device: torch.device, tasks: list[Task],
              mems: list[MemoryConfig]) -> tuple[float, list[float], list[float]]:
    """What the suite's cells will cost, measured on this machine before any cell runs: the plain
    backbone's training tokens/s (timed steps on the first task), one evaluation's seconds per
    task (which also builds and caches each task's evaluation data), and each memory's slowdown
    -- its training step time over the plain backbone's, both timed the same way -- so that slow
    memories (retrieval, per-token recurrences) are budgeted for what they cost."""
    from memstack.memory.baseline import NoMemoryConfig

    def trainer(mem: MemoryConfig) -> Trainer:
        tcfg = dataclasses.replace(suite.train, max_steps=8, warmup_steps=1, progress=False)
        return Trainer(cell_model(suite, tasks[0].cfg, mem, device), tcfg, tasks[0].train_source(suite.train.batch_size, suite.seed),
                       dist=DistInfo(device=device))

    def step_time(tr: Trainer, warm: int, timed: int) -> tuple[float, int]:
        """Seconds per training step over `timed` steps after `warm` untimed ones, and tokens per step."""
        for _ in range(warm):
            tr.train_step()
        t0, tok0 = time.perf_counter(), tr.tokens
        for _ in range(timed):
            tr.train_step()
        return (time.perf_counter() - t0) / timed, (tr.tokens - tok0) // timed

    plain_step, tokens_per_step = step_time(trainer(NoMemoryConfig()), 2, 5)
    tps = tokens_per_step / plain_step
    slowdowns = [1.0 if mem.kind == "none" else max(step_time(trainer(mem), 1, 2)[0] / plain_step, 1.0)
                 for mem in mems]
    evals = []
    for task in tasks:
        m = cell_model(suite, task.cfg, NoMemoryConfig(), device).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            task.evaluate(m)
        evals.append(time.perf_counter() - t0)
    return tps, evals, slowdowns


SAFETY = 1.15   # margin over the calibrated cost (timing noise; evaluations not exactly proportional to training)


def fit_budget(suite: SuiteConfig, slowdowns: list[float], tps: float, eval_s: list[float], remaining_s: float) -> int:
    """Training tokens per cell so the whole suite fits in `remaining_s` seconds, every memory
    getting the same tokens. `slowdowns[m]` is memory m's measured step time over the plain
    backbone's (`calibrate`), applied to its training and its evaluations alike; `tps` is the
    plain backbone's training tokens/s and `eval_s` its evaluation seconds per task."""
    runs = sum(slowdowns) * len(suite.lrs)                   # plain-backbone-equivalent runs
    evals = sum(eval_s) * (2 if suite.ablate else 1)         # an ablated model is evaluated again
    train_s = remaining_s / SAFETY - runs * evals
    return int(train_s * tps / (runs * len(eval_s)))


def run_suite(suite: SuiteConfig, out_dir: str | Path, progress: bool = True, log=print) -> list[dict]:
    """Run every cell of the suite; write records.jsonl under out_dir; return the records."""
    device = resolve_device(suite.device)
    env = environment(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mems = suite.memory_list()
    tasks = [(tc, build_task(tc, suite.backbone.seg_len)) for tc in suite.tasks]
    n_cells = len(mems) * len(tasks) * len(suite.lrs)
    tokens, scale = suite.tokens_per_cell, 1.0
    t_start = time.perf_counter()
    if suite.time_budget_s:
        tps, eval_s, slowdowns = calibrate(suite, device, [t for _, t in tasks], mems)
        affordable = fit_budget(suite, slowdowns, tps, eval_s, suite.time_budget_s - (time.perf_counter() - t_start))
        min_tokens = 20 * suite.train.batch_size * suite.train.n_segments * suite.backbone.seg_len
        if affordable < min_tokens:
            from memstack.errors import ConfigError

            raise ConfigError(f"time_budget_s={suite.time_budget_s:g} leaves {max(affordable, 0):,} training tokens per "
                              f"cell for {n_cells} cells (fewer than 20 steps): raise the budget, or run fewer "
                              "memories / tasks / learning rates", what="suite budget")
        if affordable < tokens:
            scale = affordable / tokens
            tokens = affordable
        log(f"calibration: plain backbone trains at {tps:,.0f} tok/s on {env['device']}; evaluations take "
            + ", ".join(f"{tc.kind} {t:.1f}s" for (tc, _), t in zip(tasks, eval_s))
            + "; slowest memories " + ", ".join(f"{m.kind} {r:.1f}x" for r, m in sorted(
                zip(slowdowns, mems), key=lambda p: -p[0])[:3])
            + f"; {n_cells} cells x {tokens:,} tokens (budget scale {scale:.3g})")
    records = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_cells, desc=f"bench {suite.name}", unit="cell", dynamic_ncols=True)
    with open(out_dir / "records.jsonl", "w") as f:
        for tc, task in tasks:
            for mem in mems:
                for lr in suite.lrs:
                    if bar:
                        bar.set_postfix_str(f"{mem.kind} / {tc.kind} / lr {lr:g}")
                    rec = run_cell(suite, mem, tc, lr, tokens, device, env, task)
                    rec["budget_scale"], rec["tokens_per_cell"] = scale, tokens
                    records.append(rec)
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    if bar:
                        bar.update(1)
    if bar:
        bar.close()
    log(f"suite {suite.name}: {n_cells} cells in {time.perf_counter() - t_start:.0f} s")
    return records


def best_of_sweep(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(memory, task) -> the record with the best primary metric over the learning-rate sweep."""
    best: dict[tuple[str, str], dict] = {}
    for r in records:
        key, v = (r["memory"], r["task"]), r["metrics"].get(r["primary"], math.nan)
        if math.isnan(v):
            continue
        cur = best.get(key)
        if cur is None:
            best[key] = r
            continue
        cv = cur["metrics"][cur["primary"]]
        if (v > cv) if r["higher_is_better"] else (v < cv):
            best[key] = r
    return best
