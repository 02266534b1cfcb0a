"""The equal-budget harness behind `memstack bench`.

A suite trains every selected memory on the same backbone, with the same number of training
tokens per (memory, task, learning rate, seed) cell, for every task, once per seed of `seeds`.
The learning rate of each (memory, task) is chosen on the task's validation split and the test
split is reported (memstack/evals/stats.py: mean over seeds, spread, standard error), as Zoology
reports the best of a sweep -- but selected on held-out data, not on the numbers it reports.

Warm starts (`warm_start`, per task label; memstack/evals/warm.py): the plain backbone is first
trained once per (task, seed), cached, and every cell of that task and seed starts from it, so a
memory is retrofitted onto a trained model rather than learnt with it from nothing.

Budget: `tokens_per_cell` training tokens per cell, fixed: the same leaderboard on any machine
for the same seeds (up to floating-point nondeterminism). `time_budget_s` (off unless set) is for
custom suites only: the harness then times the plain backbone first and, if the suite would not
fit, shrinks every cell's budget by the same factor -- which makes the result depend on the
machine's speed; the scaling is recorded in every record.

Every record carries the exact configs (the whole suite's too), the SHA-256 of the task's data,
the seed and all the suite's seeds, the warm start's key, the git SHA and the environment.
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
from memstack.evals.warm import WarmStart, WarmStartConfig, load_warm, warm_start, warm_task_config
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
    seeds: tuple[int, ...] = (0,)
    # task label -> the plain backbone trained first, shared by every cell of that task and seed
    warm_start: dict[str, WarmStartConfig] = field(default_factory=dict)
    # also evaluate each trained cell with its memory switched off (evals/ablation.py); the
    # ablated metrics go into `metrics_ablated` (this evaluation is not in the time budget)
    ablate: bool = False
    # keep every trained cell as a checkpoint under <out>/models/<memory>-<task>-lr<lr>-seed<seed>
    # (e.g. to evaluate it later at other lengths: `memstack eval --checkpoint ...`)
    save_models: bool = False

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
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            r.append(f"seeds must be a non-empty list of distinct non-negative ints, got {list(self.seeds)}")
        labels = [t.label for t in self.tasks]
        if len(set(labels)) != len(labels):
            r.append(f"tasks: two tasks share a label ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))}); "
                     "records and warm starts are keyed by it")
        r += [f"warm_start: {k!r} is not a task of the suite; tasks: {', '.join(labels)}"
              for k in self.warm_start if k not in labels]
        for t in self.tasks:
            if self.warm_start.get(t.label) is not None and self.warm_start[t.label].task:
                try:
                    warm_task_config(t, self.warm_start[t.label])
                except ConfigError as e:
                    r += [f"warm_start.{t.label}.task: {x}" for x in e.reasons]
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


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): VmHWM on Linux, getrusage elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        return peak_rss_mb()


# ------------------------------------------------------------------------------------ cells

def _tokens_per_step(suite: SuiteConfig, task: Task, source: Any) -> int:
    n_seg = getattr(source, "n_segments", None) or suite.train.n_segments
    return suite.train.batch_size * n_seg * suite.backbone.seg_len


def cell_backbone(suite: SuiteConfig, task_cfg: TaskConfig) -> BackboneConfig:
    return dataclasses.replace(suite.backbone, vocab_size=task_cfg.vocab_size())


def cell_model(suite: SuiteConfig, task_cfg: TaskConfig, mem: MemoryConfig, device: torch.device, seed: int | None = None,
               warm: WarmStart | None = None):
    """The suite's backbone sized for the task's vocabulary, with one memory, initialised from
    `seed` (default: the suite's first) -- so every memory starts from the same backbone weights
    -- and, with a warm start, the backbone's weights replaced by the warm start's."""
    torch.manual_seed(suite.seeds[0] if seed is None else seed)
    model = build_model(ModelConfig(cell_backbone(suite, task_cfg), (mem,))).to(device)
    if warm is not None:
        load_warm(model, warm)
    return model


def run_cell(suite: SuiteConfig, mem: MemoryConfig, task_cfg: TaskConfig, lr: float, tokens: int,
             device: torch.device, env: dict, task: Task | None = None, seed: int | None = None,
             warm: WarmStart | None = None, data_sha256: str | None = None, save_dir: Path | None = None) -> dict:
    """Train one memory on one task at one learning rate and seed for `tokens` input tokens;
    evaluate on the validation and the test split."""
    seed = suite.seeds[0] if seed is None else seed
    task = task or build_task(task_cfg, suite.backbone.seg_len)
    model = cell_model(suite, task_cfg, mem, device, seed, warm)
    backbone = model.cfg.backbone
    source = task.train_source(suite.train.batch_size, seed)
    per_step = _tokens_per_step(suite, task, source)
    steps = max(1, tokens // per_step)
    tcfg = dataclasses.replace(suite.train, lr=lr, max_steps=steps, warmup_steps=max(1, int(steps * suite.warmup_frac)),
                               eval_every=0, ckpt_every=0, progress=False, seed=seed)
    trainer = Trainer(model, tcfg, source, dist=DistInfo(device=device))
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        rec = trainer.fit(progress=False)
    wall = time.perf_counter() - t0
    model.eval()
    saved = None
    if save_dir is not None:
        from memstack.checkpoint import save_checkpoint

        saved = save_dir / f"{mem.kind}-{task_cfg.label}-lr{lr:g}-seed{seed}"
        save_checkpoint(model, saved, meta={"task": to_dict(task_cfg), "seed": seed, "lr": lr, "suite": suite.name})
    t1 = time.perf_counter()
    with torch.no_grad():
        metrics = {split: task.evaluate(model, split) for split in ("val", "test")}
    eval_s = time.perf_counter() - t1
    ablation = {}
    if suite.ablate:
        from memstack.evals.ablation import ablated

        off = ablated(model)
        with torch.no_grad():
            ablation = {"metrics_ablated": task.evaluate(off, "test"), "ablation": off.ablation}
    ctx_tokens = task.context_tokens()
    return {
        "suite": suite.name, "memory": mem.kind, "task": task_cfg.label, "lr": lr, "seed": seed,
        "seeds": list(suite.seeds), "metrics": metrics["test"], "metrics_val": metrics["val"], "chance": task.chance(),
        "primary": task.primary, "higher_is_better": task.higher_is_better,
        "train_loss": rec.get("loss"), "steps": trainer.step, "train_tokens": trainer.tokens,
        "tok_per_s": trainer.tokens / max(trainer.train_time, 1e-9),
        "wall_s": wall, "eval_s": eval_s, "peak_mem_mb": peak.peak_mb,
        "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "params": model.num_params(), "memory_params": sum(p.numel() for p in model.memory.parameters()),
        "state_size": model.memory.state_size(ctx_tokens), "state_size_at_tokens": ctx_tokens,
        "state_bytes": model.memory.state_bytes(ctx_tokens),
        "data_sha256": data_sha256 or task.data_sha256(), "checkpoint": str(saved) if saved else None,
        "warm_start": ({k: warm.meta.get(k) for k in ("key", "steps", "seg_len", "lr", "train_tokens", "metrics",
                                                      "metrics_val", "cached")} if warm else None),
        "config": {"backbone": to_dict(backbone), "memory": to_dict(mem), "task": to_dict(task_cfg), "train": to_dict(tcfg),
                   "suite": to_dict(suite)},
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
        return Trainer(cell_model(suite, tasks[0].cfg, mem, device), tcfg, tasks[0].train_source(suite.train.batch_size, suite.seeds[0]),
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
    plain backbone's training tokens/s and `eval_s` its evaluation seconds per task and split.
    (Warm starts are not budgeted: they are trained once and cached.)"""
    runs = sum(slowdowns) * len(suite.lrs) * len(suite.seeds)   # plain-backbone-equivalent runs
    evals = sum(eval_s) * (3 if suite.ablate else 2)            # val + test (+ the ablated model on test)
    train_s = remaining_s / SAFETY - runs * evals
    return int(train_s * tps / (runs * len(eval_s)))


def run_suite(suite: SuiteConfig, out_dir: str | Path, progress: bool = True, log=print,
              warm_cache: bool = True) -> list[dict]:
    """Run every cell of the suite; write records.jsonl under out_dir; return the records."""
    device = resolve_device(suite.device)
    env = environment(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mems = suite.memory_list()
    tasks = [(tc, build_task(tc, suite.backbone.seg_len)) for tc in suite.tasks]
    n_cells = len(mems) * len(tasks) * len(suite.lrs) * len(suite.seeds)
    tokens, scale = suite.tokens_per_cell, 1.0
    t_start = time.perf_counter()
    if suite.time_budget_s:
        tps, eval_s, slowdowns = calibrate(suite, device, [t for _, t in tasks], mems)
        affordable = fit_budget(suite, slowdowns, tps, eval_s, suite.time_budget_s - (time.perf_counter() - t_start))
        min_tokens = 20 * suite.train.batch_size * suite.train.n_segments * suite.backbone.seg_len
        if affordable < min_tokens:
            raise ConfigError(f"time_budget_s={suite.time_budget_s:g} leaves {max(affordable, 0):,} training tokens per "
                              f"cell for {n_cells} cells (fewer than 20 steps): raise the budget, or run fewer "
                              "memories / tasks / learning rates / seeds", what="suite budget")
        if affordable < tokens:
            scale = affordable / tokens
            tokens = affordable
        log(f"calibration: plain backbone trains at {tps:,.0f} tok/s on {env['device']}; evaluations take "
            + ", ".join(f"{tc.kind} {t:.1f}s" for (tc, _), t in zip(tasks, eval_s))
            + "; slowest memories " + ", ".join(f"{m.kind} {r:.1f}x" for r, m in sorted(
                zip(slowdowns, mems), key=lambda p: -p[0])[:3])
            + f"; {n_cells} cells x {tokens:,} tokens (budget scale {scale:.3g}: the leaderboard now depends "
            "on this machine's speed)")
    records = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_cells, desc=f"bench {suite.name}", unit="cell", dynamic_ncols=True)
    with open(out_dir / "records.jsonl", "w") as f:
        for tc, task in tasks:
            data_sha = task.data_sha256()
            warms: dict[int, WarmStart | None] = {}
            wcfg = suite.warm_start.get(tc.label)
            for seed in suite.seeds:
                warms[seed] = None
                if wcfg is not None and wcfg.steps > 0:
                    if bar:
                        bar.set_postfix_str(f"warm start / {tc.label} / seed {seed}")
                    warms[seed] = warm_start(cell_backbone(suite, tc), tc, task, wcfg, suite.train, seed, device, data_sha,
                                             log=log, cache=warm_cache)
                    w = warms[seed].meta
                    log(f"warm start {tc.label} seed {seed}: {'cached' if w['cached'] else 'trained'} plain backbone "
                        f"({w['steps']} steps, window {w['seg_len']}): {task.primary} "
                        f"{w['metrics'].get(task.primary, math.nan):.4f} on test [{w['key']}]")
            for mem in mems:
                for lr in suite.lrs:
                    for seed in suite.seeds:
                        if bar:
                            bar.set_postfix_str(f"{mem.kind} / {tc.label} / lr {lr:g} / seed {seed}")
                        rec = run_cell(suite, mem, tc, lr, tokens, device, env, task, seed, warms[seed], data_sha,
                                       out_dir / "models" if suite.save_models else None)
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
    """(memory, task) -> a record of the learning rate chosen on the validation split (best mean
    over seeds; memstack/evals/stats.py): the first seed's."""
    from memstack.evals.stats import best_entries

    return {k: e.record for k, e in best_entries(records).items()}
