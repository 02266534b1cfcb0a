"""The leaderboard: a Markdown table (best of the learning-rate sweep per memory and task) and
PNG plots -- quality against state size (the Zoology frontier), bits per byte per memory, and
the passkey depth x length grid per memory."""
from __future__ import annotations

import math
from pathlib import Path

from memstack.evals.bench import best_of_sweep

def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _size(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def leaderboard_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    best = best_of_sweep(records)
    memories = list(dict.fromkeys(r["memory"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    base_tps = {t: best[("none", t)]["tok_per_s"] for t in tasks if ("none", t) in best}
    ablate = any("metrics_ablated" in r for r in records)
    header = ["memory"] + [f"{t} {best_or(records, t)}" + (" [memory off]" if ablate else "") for t in tasks]
    header += ["state size", "params", "tok/s vs none"]
    rows = []
    for m in memories:
        row = [m]
        for t in tasks:
            r = best.get((m, t))
            cell = f"{_fmt(r['metrics'][r['primary']])} (lr {r['lr']:g})" if r else "-"
            if r and "metrics_ablated" in r:
                cell += f" [{_fmt(r['metrics_ablated'].get(r['primary'], math.nan))}]"
            row.append(cell)
        any_r = next((best[(m, t)] for t in tasks if (m, t) in best), None)
        sizes = sorted({(best[(m, t)]["state_size"], best[(m, t)]["state_size_at_tokens"]) for t in tasks if (m, t) in best})
        row.append(", ".join(f"{_size(s)}@{n}" for s, n in sizes) if sizes else "-")
        row.append(_size(any_r["params"]) if any_r else "-")
        ratios = [best[(m, t)]["tok_per_s"] / base_tps[t] for t in tasks if (m, t) in best and t in base_tps]
        row.append(f"{sum(ratios) / len(ratios):.2f}x" if ratios else "-")
        rows.append(row)
    return header, rows


def best_or(records: list[dict], task: str) -> str:
    r = next(r for r in records if r["task"] == task)
    return f"{r['primary']} {'↑' if r['higher_is_better'] else '↓'}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def write_report(records: list[dict], out_dir: str | Path, command: str = "") -> str:
    """Write leaderboard.md and the PNG plots into out_dir; return the leaderboard as text."""
    out_dir = Path(out_dir)
    header, rows = leaderboard_rows(records)
    r0 = records[0]
    scale = r0.get("budget_scale", 1.0)
    md = [f"# Leaderboard: suite `{r0['suite']}`", "",
          f"- command: `{command or 'memstack bench'}`",
          f"- device: {r0['device']}; torch {r0['torch']}; memstack {r0['memstack']} @ {r0['git_sha']}",
          f"- budget: {r0['tokens_per_cell']:,} training tokens per (memory, task, lr) cell"
          + (f" (scaled by {scale:.3g} to fit the time budget)" if scale < 1 else ""),
          f"- backbone: {_backbone_line(r0)}",
          f"- learning rates swept: {sorted({r['lr'] for r in records})}; best of the sweep per cell is shown",
          "- state size: elements of memory state per example at the given context length (Zoology's axis)"]
    if any("metrics_ablated" in r for r in records):
        md.append("- [memory off]: the same trained model evaluated with its memory switched off "
                  "(stateful memories reset at every segment, stateless ones closed or zeroed; memstack/evals/ablation.py)")
    md += ["", markdown_table(header, rows), ""]
    md += _details(records)
    plots = _plots(records, out_dir)
    md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / "leaderboard.md").write_text("\n".join(md) + "\n")
    return text_table(header, rows)


def _backbone_line(r: dict) -> str:
    b = r["config"]["backbone"]
    return (f"{b['n_layers']} layers, d_model {b['d_model']}, {b['n_heads']} heads / "
            f"{b['n_kv_heads'] or b['n_heads']} kv heads, seg_len {b['seg_len']}")


def _details(records: list[dict]) -> list[str]:
    out = ["## Every cell", "", "| memory | task | lr | metrics | train loss | steps | tok/s | peak MB | wall s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ms = ", ".join(f"{k} {_fmt(v)}" for k, v in r["metrics"].items() if "@" not in k and isinstance(v, float))
        out.append(f"| {r['memory']} | {r['task']} | {r['lr']:g} | {ms} | {_fmt(r['train_loss'])} | {r['steps']} | "
                   f"{r['tok_per_s']:,.0f} | {r['peak_mem_mb']:.0f} | {r['wall_s']:.1f} |")
    return out


def _plots(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_of_sweep(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    memories = list(dict.fromkeys(r["memory"] for r in records))
    paths = []

    paths.append(_frontier(plt, best, records, tasks, memories, out_dir))
    if any("metrics_ablated" in r for r in records):
        paths.append(_ablation_plot(plt, best, records, tasks, memories, out_dir))

    if "lm" in tasks and any((m, "lm") in best for m in memories):
        ms = [m for m in memories if (m, "lm") in best]
        vals = [best[(m, "lm")]["metrics"]["bpb"] for m in ms]
        fig, ax = plt.subplots(figsize=(1.2 * len(ms) + 2, 3.4))
        ax.bar(ms, vals, color="tab:blue")
        lo = min(vals)
        ax.set_ylim(lo * 0.95, max(vals) * 1.01)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title("language modelling, test split")
        fig.tight_layout()
        paths.append(out_dir / "bpb.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if "passkey" in tasks and any((m, "passkey") in best for m in memories):
        ms = [m for m in memories if (m, "passkey") in best]
        cfg = best[(ms[0], "passkey")]["config"]["task"]
        lengths, depths = cfg["lengths"], cfg["depths"]
        fig, axes = plt.subplots(1, len(ms), figsize=(2.6 * len(ms) + 1, 2.8), squeeze=False)
        for ax, m in zip(axes[0], ms):
            met = best[(m, "passkey")]["metrics"]
            grid = [[met.get(f"exact@{L}/{d:g}", math.nan) for L in lengths] for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_xlabel("length (tokens)")
            ax.set_title(m, fontsize=9)
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact match")
        paths.append(out_dir / "passkey_grid.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


_MARKERS = "os^DvP*Xh<>p"


def _style(i: int) -> dict:
    import matplotlib.pyplot as plt

    return {"color": plt.get_cmap("tab10" if i < 10 else "tab20")(i % 20), "marker": _MARKERS[i % len(_MARKERS)]}


def _frontier(plt, best: dict, records: list[dict], tasks: list[str], memories: list[str], out_dir: Path) -> Path:
    """Quality against state size (the Zoology frontier): one labelled marker per memory on a
    log-scale state axis. Memories of equal state size (e.g. several stateless ones at 0) are
    spread slightly along the axis and their labels stacked, so every one stays visible; the
    label carries the exact size."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks) + 1.8, 4.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        pts = []
        for i, m in enumerate(memories):
            r = best.get((m, t))
            if r:
                pts.append((i, m, r["state_size"], r["metrics"][r["primary"]]))
        groups: dict[int, list] = {}
        for p in pts:
            groups.setdefault(round(math.log10(max(p[2], 1)) / 0.15), []).append(p)
        for grp in groups.values():
            grp.sort(key=lambda p: p[3])
            n = len(grp)
            for k, (i, m, size, y) in enumerate(grp):
                st = _style(i)
                x = max(size, 1) * 10 ** (0.05 * (k - (n - 1) / 2))          # spread equal sizes
                ax.scatter([x], [y], s=60, color=st["color"], marker=st["marker"], edgecolor="black", linewidth=0.5,
                           zorder=3, label=f"{m} ({_size(size)})")
                ax.annotate(m, (x, y), textcoords="offset points", xytext=(7, 11 * (k - (n - 1) / 2) - 3), fontsize=8,
                            color=st["color"])
        if pts:
            xs = [max(p[2], 1) for p in pts]
            ax.set_xlim(min(xs) / 4, max(xs) * 6)
            ax.margins(y=0.12)
        r0 = next(r for r in records if r["task"] == t)
        ax.set_xscale("log")
        ax.set_xlabel(f"state size (elements per example at {r0['state_size_at_tokens']} tokens; 0 plotted at 1)")
        ax.set_ylabel(f"{r0['primary']} ({'higher' if r0['higher_is_better'] else 'lower'} is better)")
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


def _ablation_plot(plt, best: dict, records: list[dict], tasks: list[str], memories: list[str], out_dir: Path) -> Path:
    """Per task, each memory's primary metric with its memory on and switched off."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 0.9 * len(memories) + 1.5) * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        ms = [m for m in memories if (m, t) in best and "metrics_ablated" in best[(m, t)]]
        on = [best[(m, t)]["metrics"][best[(m, t)]["primary"]] for m in ms]
        off = [best[(m, t)]["metrics_ablated"].get(best[(m, t)]["primary"], math.nan) for m in ms]
        xs = range(len(ms))
        ax.bar([x - 0.2 for x in xs], on, width=0.4, label="memory on", color="tab:blue")
        ax.bar([x + 0.2 for x in xs], off, width=0.4, label="memory off", color="tab:gray")
        ax.set_xticks(list(xs), ms, rotation=30, ha="right", fontsize=8)
        r0 = next(r for r in records if r["task"] == t)
        ax.set_ylabel(f"{r0['primary']} ({'higher' if r0['higher_is_better'] else 'lower'} is better)")
        ax.set_title(t, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "memory_ablation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
