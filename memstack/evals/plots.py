"""The leaderboard's PNG plots: quality against state size (the Zoology frontier) per task, one
bar chart per task (mean over seeds with standard-error bars, chance and the warm start's
full-attention score as lines), the memory-off ablation and the passkey depth x length grid."""
from __future__ import annotations

import math
from pathlib import Path

from memstack.evals.stats import Entry, best_entries

_MARKERS = "os^DvP*Xh<>p"


def _size(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _style(i: int) -> dict:
    import matplotlib.pyplot as plt

    return {"color": plt.get_cmap("tab10" if i < 10 else "tab20")(i % 20), "marker": _MARKERS[i % len(_MARKERS)]}


def _ylabel(e: Entry) -> str:
    return f"{e.primary} ({'higher' if e.higher_is_better else 'lower'} is better)"


def plots(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {k: e for k, e in best_entries(records).items() if e.test}
    tasks = list(dict.fromkeys(r["task"] for r in records))
    memories = list(dict.fromkeys(r["memory"] for r in records))
    paths = [_frontier(plt, best, tasks, memories, out_dir)]
    if any("metrics_ablated" in r for r in records):
        paths.append(_ablation_plot(plt, best, tasks, memories, out_dir))
    for t in tasks:
        ms = [m for m in memories if (m, t) in best]
        if ms:
            paths.append(_bars(plt, [best[(m, t)] for m in ms], records, t, out_dir))
    for t in tasks:
        ms = [m for m in memories if (m, t) in best and _lengths(best[(m, t)])]
        if ms:
            paths.append(_length_curve(plt, [best[(m, t)] for m in ms], records, t, out_dir))
    if any((m, "passkey") in best for m in memories):
        paths.append(_passkey_grid(plt, [best[(m, "passkey")] for m in memories if (m, "passkey") in best], out_dir))
    return paths


def _bars(plt, es: list[Entry], records: list[dict], task: str, out_dir: Path) -> Path:
    vals, errs = [e.mean for e in es], [e.se for e in es]
    fig, ax = plt.subplots(figsize=(0.75 * len(es) + 2.5, 3.6))
    xs = range(len(es))
    ax.bar(xs, vals, yerr=errs, color="tab:blue", capsize=3)
    for e, x in zip(es, xs):   # every seed as a dot
        ax.scatter([x] * len(e.test), e.test, color="black", s=8, zorder=3)
    ax.set_xticks(list(xs), [e.memory for e in es], rotation=35, ha="right", fontsize=8)
    r0 = next(r for r in records if r["task"] == task)
    if r0.get("chance") is not None:
        ax.axhline(r0["chance"], color="tab:red", linestyle="--", linewidth=1, label=f"chance {r0['chance']:.3g}")
    warm = [r["warm_start"]["metrics"].get(r["primary"]) for r in records if r["task"] == task and r.get("warm_start")]
    warm = [w for w in warm if w is not None]
    if warm:
        ax.axhline(sum(warm) / len(warm), color="tab:green", linestyle=":", linewidth=1,
                   label=f"warm start, {r0['warm_start']['seg_len']}-token window")
    if not es[0].higher_is_better:   # bits per byte: zoom on the range the bars span
        lo, hi = min(v - e for v, e in zip(vals, errs)), max(v + e for v, e in zip(vals, errs))
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_ylabel(_ylabel(es[0]))
    ax.set_title(f"{task}, test split: mean over seeds ± standard error (dots: seeds)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / ("bpb.png" if task == "lm" else f"{task}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lengths(e: Entry) -> list[int]:
    """Evaluation lengths of a task that reports `<primary>@<tokens>` per length (longctx)."""
    pre = f"{e.primary}@"
    return sorted(int(k[len(pre):]) for k in e.record["metrics"] if k.startswith(pre) and k[len(pre):].isdigit())


def _length_curve(plt, es: list[Entry], records: list[dict], task: str, out_dir: Path) -> Path:
    """Accuracy against evaluation length, one line per memory (mean over seeds; bars: the
    Wilson 95 % interval of the seeds' pooled examples), chance as a line, the trained length marked."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, e in enumerate(es):
        Ls = _lengths(e)
        ys, lo, hi = [], [], []
        for L in Ls:
            ks = [r["metrics"].get(f"{e.primary}@{L}", math.nan) * r["metrics"].get(f"n@{L}", 0) for r in e.records]
            ns = [r["metrics"].get(f"n@{L}", 0) for r in e.records]
            from memstack.evals.longctx import wilson

            k, n = int(round(sum(ks))), int(sum(ns))
            ys.append(k / n if n else math.nan)
            a, b = wilson(k, n)
            lo.append(ys[-1] - a)
            hi.append(b - ys[-1])
        st = _style(i)
        ax.errorbar(Ls, ys, yerr=[lo, hi], color=st["color"], marker=st["marker"], capsize=2, label=e.memory)
    r0 = next(r for r in records if r["task"] == task)
    if r0.get("chance") is not None:
        ax.axhline(r0["chance"], color="tab:red", linestyle="--", linewidth=1, label=f"chance {r0['chance']:.3g}")
    train_len = r0["config"]["task"].get("train_len")
    if train_len:
        ax.axvline(train_len, color="gray", linestyle=":", linewidth=1, label=f"trained at {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel(f"{es[0].primary} (test)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{task}: accuracy against length (bars: Wilson 95 % interval)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out_dir / f"{task}_by_length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _passkey_grid(plt, es: list[Entry], out_dir: Path) -> Path:
    cfg = es[0].record["config"]["task"]
    lengths, depths = cfg["lengths"], cfg["depths"]
    fig, axes = plt.subplots(1, len(es), figsize=(2.6 * len(es) + 1, 2.8), squeeze=False)
    im = None
    for ax, e in zip(axes[0], es):
        def cell(L, d):
            vs = [r["metrics"].get(f"exact@{L}/{d:g}", math.nan) for r in e.records]
            return sum(vs) / len(vs)

        grid = [[cell(L, d) for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_title(e.memory, fontsize=9)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match (mean over seeds)")
    path = out_dir / "passkey_grid.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _frontier(plt, best: dict, tasks: list[str], memories: list[str], out_dir: Path) -> Path:
    """Quality against state size (the Zoology frontier): one labelled marker per memory (mean
    over seeds, standard-error bar) on a log-scale state axis. Memories of equal state size are
    spread slightly along the axis and their labels stacked, so every one stays visible."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks) + 1.8, 4.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        pts = [(i, m, best[(m, t)]) for i, m in enumerate(memories) if (m, t) in best]
        groups: dict[int, list] = {}
        for p in pts:
            groups.setdefault(round(math.log10(max(p[2].record["state_size"], 1)) / 0.15), []).append(p)
        for grp in groups.values():
            grp.sort(key=lambda p: p[2].mean)
            n = len(grp)
            for k, (i, m, e) in enumerate(grp):
                st, size = _style(i), e.record["state_size"]
                x = max(size, 1) * 10 ** (0.05 * (k - (n - 1) / 2))          # spread equal sizes
                ax.errorbar([x], [e.mean], yerr=[e.se], fmt="none", ecolor=st["color"], capsize=2, zorder=2)
                ax.scatter([x], [e.mean], s=60, color=st["color"], marker=st["marker"], edgecolor="black", linewidth=0.5,
                           zorder=3, label=f"{m} ({_size(size)})")
                ax.annotate(m, (x, e.mean), textcoords="offset points", xytext=(7, 11 * (k - (n - 1) / 2) - 3),
                            fontsize=8, color=st["color"])
        if pts:
            xs = [max(p[2].record["state_size"], 1) for p in pts]
            ax.set_xlim(min(xs) / 4, max(xs) * 6)
            ax.margins(y=0.12)
            r0 = pts[0][2].record
            ax.set_xlabel(f"state size (elements per example at {r0['state_size_at_tokens']} tokens; 0 plotted at 1)")
            ax.set_ylabel(_ylabel(pts[0][2]))
        ax.set_xscale("log")
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False, title="memory (state)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_size_inches()[0] if handles else 1, 1))
    path = out_dir / "quality_vs_state_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ablation_plot(plt, best: dict, tasks: list[str], memories: list[str], out_dir: Path) -> Path:
    """Per task, each memory's primary metric with its memory on and switched off (seed means)."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.9 * len(memories) + 1.5) * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        es = [best[(m, t)] for m in memories if (m, t) in best and "metrics_ablated" in best[(m, t)].record]
        on = [e.mean for e in es]
        off = [sum(r["metrics_ablated"].get(r["primary"], math.nan) for r in e.records) / len(e.records) for e in es]
        xs = range(len(es))
        ax.bar([x - 0.2 for x in xs], on, width=0.4, label="memory on", color="tab:blue")
        ax.bar([x + 0.2 for x in xs], off, width=0.4, label="memory off", color="tab:gray")
        ax.set_xticks(list(xs), [e.memory for e in es], rotation=30, ha="right", fontsize=8)
        if es:
            ax.set_ylabel(_ylabel(es[0]))
        ax.set_title(t, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "memory_ablation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
