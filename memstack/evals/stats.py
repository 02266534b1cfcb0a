"""Seeds, spread and selection for the leaderboard.

A suite runs every (memory, task, learning rate) cell once per seed. Here the records are grouped
per (memory, task, lr); the learning rate of a (memory, task) is chosen on the **validation**
split (best mean over seeds of the primary metric) and the **test** split is reported: its mean
over seeds, the seeds' range, and a standard error

    se = sqrt( sum_i se_i^2 / S^2  +  s^2 / S )

where se_i is seed i's evaluation standard error (binomial for accuracies, from the per-token
losses for bits per byte; 0 when the task gives none) and s the standard deviation of the S
seeds' values (0 for one seed). The first term is the sampling error of the test set, the second
the training run's; counting both is conservative (s already holds some evaluation noise).

Two entries are compared by their difference, its z = diff / sqrt(se_a^2 + se_b^2), and whether
their seed ranges are disjoint ("beyond the spread": every seed of one is better than every seed
of the other).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Entry:
    """One (memory, task, lr) over its seeds."""

    memory: str
    task: str
    lr: float
    primary: str
    higher_is_better: bool
    seeds: list[int] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    test_se: list[float] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return _mean(self.test)

    @property
    def val_mean(self) -> float:
        return _mean(self.val)

    @property
    def sd(self) -> float:
        return _sd(self.test)

    @property
    def lo(self) -> float:
        return min(self.test) if self.test else math.nan

    @property
    def hi(self) -> float:
        return max(self.test) if self.test else math.nan

    @property
    def se(self) -> float:
        S = len(self.test)
        if not S:
            return math.nan
        sampling = sum(x * x for x in self.test_se) / S ** 2
        return math.sqrt(sampling + (self.sd ** 2 / S if S > 1 else 0.0))

    @property
    def record(self) -> dict:
        """A representative record (the first seed's): configs, sizes and speeds are shared by the seeds."""
        return self.records[0]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def entries(records: list[dict]) -> dict[tuple[str, str, float], Entry]:
    """(memory, task, lr) -> Entry over the seeds. A seed whose primary test metric is missing or
    not finite (a diverged run) makes the entry's test and val lists shorter than its records."""
    out: dict[tuple[str, str, float], Entry] = {}
    for r in records:
        key = (r["memory"], r["task"], r["lr"])
        e = out.get(key)
        if e is None:
            e = out[key] = Entry(r["memory"], r["task"], r["lr"], r["primary"], r["higher_is_better"])
        e.records.append(r)
        e.seeds.append(r.get("seed", 0))
        t = r["metrics"].get(r["primary"], math.nan)
        # records written before tasks had a validation split: chosen on test (the report says so)
        v = r.get("metrics_val", r["metrics"]).get(r["primary"], math.nan)
        if _finite(t) and _finite(v):
            e.test.append(float(t))
            e.val.append(float(v))
            se = r["metrics"].get(f"{r['primary']}_se", 0.0)
            e.test_se.append(float(se) if _finite(se) else 0.0)
    return out


def best_entries(records: list[dict]) -> dict[tuple[str, str], Entry]:
    """(memory, task) -> the learning rate's Entry with the best validation mean. An lr where any
    seed diverged on validation is not chosen while another lr has every seed finite; ties keep
    the first lr. Only validation values decide (a test value is never looked at to choose)."""
    def vals(e: Entry) -> list:
        return [r.get("metrics_val", r["metrics"]).get(r["primary"], math.nan) for r in e.records]

    def val_ok(e: Entry) -> list[bool]:
        return [_finite(v) for v in vals(e)]

    def val_mean(e: Entry) -> float:
        return _mean([float(v) for v in vals(e) if _finite(v)])

    best: dict[tuple[str, str], Entry] = {}
    for (m, t, _), e in entries(records).items():
        if not any(val_ok(e)):
            continue
        cur = best.get((m, t))
        complete, cur_complete = all(val_ok(e)), cur is not None and all(val_ok(cur))
        if cur is None or (complete and not cur_complete) or (
                complete == cur_complete and e.better(val_mean(e), val_mean(cur))):
            best[(m, t)] = e
    return best


@dataclass(frozen=True)
class Comparison:
    diff: float          # a.mean - b.mean (in the metric's own units)
    z: float             # diff / sqrt(se_a^2 + se_b^2); nan when both se are 0 (nothing to measure it against)
    beyond_spread: bool  # the seed ranges do not overlap (needs >= 2 seeds on each side)


def compare(a: Entry, b: Entry) -> Comparison:
    diff = a.mean - b.mean
    se = math.sqrt(a.se ** 2 + b.se ** 2)
    spread = len(a.test) > 1 and len(b.test) > 1 and (a.lo > b.hi or a.hi < b.lo)
    return Comparison(diff, diff / se if se > 0 else math.nan, spread)


def z_vs_value(e: Entry, value: float) -> float:
    """How many standard errors the entry's mean is from a fixed value (e.g. chance)."""
    return (e.mean - value) / e.se if e.se > 0 else math.nan


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % at z 1.96): stays inside [0, 1] and is not
    empty at k = 0 or k = n, where the normal interval p +- z se collapses to a point."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    c = z * z / n
    mid = (p + c / 2) / (1 + c)
    half = z * math.sqrt(p * (1 - p) / n + c / (4 * n)) / (1 + c)
    return (max(0.0, mid - half), min(1.0, mid + half))


def proportion(hits: list[bool], groups: list[int] | None = None) -> dict:
    """A recall-like proportion with its spread: k, n, mean, binomial se, Wilson 95 % interval and,
    when `groups` (e.g. the user of each fact) is given, the standard error over the groups' means
    (facts of one user share that user's memory, so they are not independent draws)."""
    k, n = sum(bool(h) for h in hits), len(hits)
    out = {"k": k, "n": n, "mean": k / n if n else math.nan,
           "se": math.sqrt((k / n) * (1 - k / n) / n) if n else math.nan, "ci95": list(wilson(k, n))}
    if groups is not None:
        per: dict[int, list[bool]] = {}
        for g, h in zip(groups, hits):
            per.setdefault(g, []).append(bool(h))
        means = [sum(v) / len(v) for v in per.values()]
        out["se_groups"] = _sd(means) / math.sqrt(len(means)) if means else math.nan
        out["groups"] = len(means)
    return out
