"""The leaderboard: per (memory, task), the learning rate chosen on the validation split and the
test metric's mean over seeds with its standard error (memstack/evals/stats.py); references
(chance, the warm-start backbone with full attention over the example); a comparison of every
memory with the plain backbone -- the difference, its z and whether it is beyond the seeds'
spread; Markdown, text and PNG plots (memstack/evals/plots.py)."""
from __future__ import annotations

import math
from pathlib import Path

from memstack.evals.stats import Entry, best_entries, compare, z_vs_value

BASELINE = "none"


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def _size(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _order(records: list[dict], key: str) -> list[str]:
    return list(dict.fromkeys(r[key] for r in records))


def _value(e: Entry, sweep: bool) -> str:
    if not e.test:
        return "-"
    out = _fmt(e.mean) + (f" ± {_fmt(e.se)}" if len(e.test) > 1 or e.se > 0 else "")
    return out + (f" (lr {e.lr:g})" if sweep else "")


def leaderboard_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per memory: per task "mean ± se" of the test metric over seeds (the lr chosen on
    validation, shown when the suite swept several), then state size, parameters and training
    speed relative to the plain backbone."""
    best = best_entries(records)
    memories, tasks = _order(records, "memory"), _order(records, "task")
    sweep = {t: len({r["lr"] for r in records if r["task"] == t}) > 1 for t in tasks}
    base_tps = {t: _mean_tps(best[(BASELINE, t)]) for t in tasks if (BASELINE, t) in best}
    ablate = any("metrics_ablated" in r for r in records)
    header = ["memory"] + [f"{t} {metric_label(records, t)}" + (" [memory off]" if ablate else "") for t in tasks]
    header += ["state size", "params", "tok/s vs none"]
    rows = []
    for m in memories:
        row = [m]
        for t in tasks:
            e = best.get((m, t))
            cell = _value(e, sweep[t]) if e else "-"
            if e and e.test and "metrics_ablated" in e.record:
                offs = [r["metrics_ablated"].get(r["primary"], math.nan) for r in e.records if "metrics_ablated" in r]
                cell += f" [{_fmt(sum(offs) / len(offs))}]"
            row.append(cell)
        ms = [best[(m, t)] for t in tasks if (m, t) in best]
        sizes = sorted({(e.record["state_size"], e.record["state_size_at_tokens"]) for e in ms})
        row.append(", ".join(f"{_size(s)}@{n}" for s, n in sizes) if sizes else "-")
        row.append(_size(ms[0].record["params"]) if ms else "-")
        ratios = [_mean_tps(best[(m, t)]) / base_tps[t] for t in tasks if (m, t) in best and t in base_tps]
        row.append(f"{sum(ratios) / len(ratios):.2f}x" if ratios else "-")
        rows.append(row)
    return header, rows


def _mean_tps(e: Entry) -> float:
    return sum(r["tok_per_s"] for r in e.records) / len(e.records)


def metric_label(records: list[dict], task: str) -> str:
    r = next(r for r in records if r["task"] == task)
    return f"{r['primary']} {'↑' if r['higher_is_better'] else '↓'}"


def reference_rows(records: list[dict]) -> list[str]:
    """Lines for each task's references: chance, and the warm start's full-attention backbone."""
    out = []
    for t in _order(records, "task"):
        rs = [r for r in records if r["task"] == t]
        r0 = rs[0]
        parts = []
        if r0.get("chance") is not None:
            parts.append(f"chance {_fmt(r0['chance'], 4)}")
        warm = {r["seed"]: r["warm_start"] for r in rs if r.get("warm_start")}
        if warm:
            vals = [w["metrics"].get(r0["primary"], math.nan) for w in warm.values()]
            w0 = next(iter(warm.values()))
            parts.append(f"warm start: the plain backbone trained {w0['steps']} steps with a {w0['seg_len']}-token window "
                         f"scores {_fmt(sum(vals) / len(vals))} (mean of {len(vals)} seed(s)); every cell starts from it")
        if parts:
            out.append(f"{t}: " + "; ".join(parts))
    return out


def comparison_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every memory against the plain backbone, per task: the difference of the means, z, and
    whether the seeds' ranges are disjoint; for tasks with a chance level, z of the mean vs chance."""
    best = best_entries(records)
    memories, tasks = _order(records, "memory"), _order(records, "task")
    header = ["memory"]
    for t in tasks:
        header += [f"{t}: diff vs none", "z", "beyond spread"]
    rows = []
    for m in memories:
        row = [m]
        for t in tasks:
            a, b = best.get((m, t)), best.get((BASELINE, t))
            if not a or not b or not a.test or not b.test:
                row += ["-", "-", "-"]
                continue
            if m == BASELINE:
                chance = a.record.get("chance")
                row += ["0", f"{_fmt(z_vs_value(a, chance), 1)} vs chance" if chance is not None else "-", "-"]
                continue
            c = compare(a, b)
            row += [f"{c.diff:+.3f}", _fmt(c.z, 1), "yes" if c.beyond_spread else "no"]
        rows.append(row)
    return header, rows


def summary_lines(records: list[dict]) -> list[str]:
    """For each task with a chance level: where the plain backbone sits relative to chance, and
    which memories are at least 5 standard errors above it (better in the metric's direction)."""
    best = best_entries(records)
    out = []
    for t in _order(records, "task"):
        b = best.get((BASELINE, t))
        if not b or not b.test:
            continue
        sign = 1 if b.higher_is_better else -1
        chance = b.record.get("chance")
        head = f"{t}: none {_fmt(b.mean)} ± {_fmt(b.se)}"
        if chance is not None:
            head += f" ({_fmt(z_vs_value(b, chance), 1)} SE from chance {_fmt(chance, 4)})"
        strong = sorted(((m, compare(e, b)) for (m, tt), e in best.items() if tt == t and m != BASELINE and e.test),
                        key=lambda p: -sign * p[1].diff)
        above = [f"{m} ({c.z * sign:.0f} SE)" for m, c in strong if math.isfinite(c.z) and sign * c.z >= 5]
        spread = [m for m, c in strong if c.beyond_spread and sign * c.diff > 0]
        out.append(head + f"; {len(above)} memories >= 5 SE better: " + (", ".join(above) or "none")
                   + f"; better than none beyond the seeds' spread: {', '.join(spread) or 'none'}")
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def write_report(records: list[dict], out_dir: str | Path, command: str = "") -> str:
    """Write leaderboard.md and the PNG plots into out_dir; return the leaderboard as text
    (the table, then the references and the summary lines)."""
    from memstack.evals.plots import plots

    out_dir = Path(out_dir)
    header, rows = leaderboard_rows(records)
    r0 = records[0]
    scale = r0.get("budget_scale", 1.0)
    seeds = sorted({r.get("seed", 0) for r in records})
    md = [f"# Leaderboard: suite `{r0['suite']}`", "",
          f"- command: `{command or 'memstack bench'}`",
          f"- device: {r0['device']}; torch {r0['torch']}; memstack {r0['memstack']} @ {r0['git_sha']}",
          f"- budget: {r0['tokens_per_cell']:,} training tokens per (memory, task, lr, seed) cell"
          + (f" (scaled by {scale:.3g} to fit the time budget: this leaderboard depends on the machine's speed)"
             if scale < 1 else " (fixed: the same on any machine)"),
          f"- seeds: {seeds}; each value is the mean over the seeds ± its standard error (test-set sampling and the "
          "seeds' spread; memstack/evals/stats.py)",
          f"- backbone: {_backbone_line(r0)}",
          f"- learning rates swept: {sorted({r['lr'] for r in records})}; chosen per (memory, task) on the validation "
          "split, reported on the test split",
          "- state size: elements of memory state per example at the given context length (Zoology's axis)"]
    if any("metrics_val" not in r for r in records):
        md.append("- **some records predate validation splits: for them the learning rate was chosen on the test split**")
    if any("metrics_ablated" in r for r in records):
        md.append("- [memory off]: the same trained models evaluated with their memory switched off "
                  "(memstack/evals/ablation.py)")
    data = sorted({(r["task"], r["data_sha256"]) for r in records if r.get("data_sha256")})
    if data:
        md.append("- data (SHA-256 of each task's train/val/test data): " + ", ".join(f"{t} `{h[:16]}`" for t, h in data))
    md += ["", markdown_table(header, rows), ""]
    refs, summary = reference_rows(records), summary_lines(records)
    md += [f"- {x}" for x in refs + summary]
    ch, cr = comparison_rows(records)
    md += ["", "## Against the plain backbone", "",
           "diff = memory - none (test means); z = diff / sqrt(se_memory^2 + se_none^2); beyond spread = every seed of "
           "the memory on the other side of every seed of none. For none: its distance from chance in standard errors.",
           "", markdown_table(ch, cr), ""]
    md += _details(records)
    paths = plots(records, out_dir)
    md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in paths]
    (out_dir / "leaderboard.md").write_text("\n".join(md) + "\n")
    return "\n".join([text_table(header, rows), ""] + refs + summary)


def _backbone_line(r: dict) -> str:
    b = r["config"]["backbone"]
    return (f"{b['n_layers']} layers, d_model {b['d_model']}, {b['n_heads']} heads / "
            f"{b['n_kv_heads'] or b['n_heads']} kv heads, seg_len {b['seg_len']}")


def _details(records: list[dict]) -> list[str]:
    out = ["## Every cell", "", "| memory | task | lr | seed | test metrics | val primary | train loss | steps | tok/s | "
           "peak MB | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ms = ", ".join(f"{k} {_fmt(v)}" for k, v in r["metrics"].items() if "@" not in k and isinstance(v, float))
        val = r.get("metrics_val", {}).get(r["primary"], math.nan)
        out.append(f"| {r['memory']} | {r['task']} | {r['lr']:g} | {r.get('seed', 0)} | {ms} | {_fmt(val)} | "
                   f"{_fmt(r['train_loss'])} | {r['steps']} | {r['tok_per_s']:,.0f} | {r['peak_mem_mb']:.0f} | "
                   f"{r['wall_s']:.1f} |")
    return out
