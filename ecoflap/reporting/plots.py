"""Plots a person would rather look at than read: allocation profiles and metric curves."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ecoflap.utils.io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_allocation(unit_sparsity: dict[str, float], path: str | Path, title: str, target: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(max(6, len(unit_sparsity) * 0.12), 3))
    ax.plot(range(len(unit_sparsity)), list(unit_sparsity.values()), marker="o", ms=3, label="allocated")
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label="target")
        ax.legend(fontsize=8)
    ax.set_xlabel("unit (model order)")
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_metrics(table: pd.DataFrame, metrics: list[str], path: str | Path, title: str,
                 bounds: tuple[str, str] = (" lo95", " hi95")) -> None:
    """One panel per metric: metric against target sparsity, a line per method, error bars
    from the columns `metric + bounds[0]` and `metric + bounds[1]` where the table has them
    (a 95 % bootstrap interval; over seeds, the range)."""
    pruned = table[table["method"] != "dense"]
    dense = table[table["method"] == "dense"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        lo, hi = metric + bounds[0], metric + bounds[1]
        for method, rows in pruned.groupby("method", sort=False):
            rows = rows.dropna(subset=["target", metric]).sort_values("target")
            if lo in rows and rows[lo].notna().all():  # error bars
                err = [rows[metric] - rows[lo], rows[hi] - rows[metric]]
                ax.errorbar(rows["target"], rows[metric], yerr=err, marker="o", capsize=3, label=method)
            else:
                ax.plot(rows["target"], rows[metric], marker="o", label=method)
        if not dense.empty and metric in dense and pd.notna(dense[metric].iloc[0]):
            ax.axhline(dense[metric].iloc[0], color="k", ls="--", lw=1, label="dense")
            if lo in dense and pd.notna(dense[lo].iloc[0]):
                ax.axhspan(dense[lo].iloc[0], dense[hi].iloc[0], color="k", alpha=0.08)
        if metric.startswith("perplexity"):
            ax.set_yscale("log")
        ax.set_xlabel("target sparsity")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, y=1.03)
    _save(fig, path)


def plot_profiles(profiles: dict[str, dict[str, list[float]]], path: str | Path, title: str
                  ) -> list[dict[str, Any]]:
    """profiles[sparsity label][method] = achieved sparsity per block; one panel per sparsity.

    Each method keeps one colour in every panel. Methods whose profiles are identical in a
    panel (every uniform one) share a line, drawn in the colour of the first of them and
    labelled with all their names in that panel's own legend: the panels differ in which
    methods coincide, so one legend for all panels would mislabel lines. Returns what was
    drawn, panel by panel ({"title", "lines": [{"label", "color", "values"}]}), read back
    from the figure itself so a test can check every line against its label."""
    methods = list(dict.fromkeys(m for per_method in profiles.values() for m in per_method))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 3.4), squeeze=False, sharey=True)
    drawn = []
    for ax, (label, per_method) in zip(axes[0], profiles.items()):
        same: dict[tuple, list[str]] = {}
        for method, values in per_method.items():
            same.setdefault(tuple(round(v, 4) for v in values), []).append(method)
        for names in same.values():
            values = per_method[names[0]]
            ax.plot(range(len(values)), values, marker=".", color=colour[names[0]], label=", ".join(names))
        ax.set_title(f"target {label}")
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        drawn.append({"title": ax.get_title(), "lines": [
            {"label": line.get_label(), "color": line.get_color(), "values": list(line.get_ydata())}
            for line in ax.get_lines()], "legend": [
            {"label": text.get_text(), "color": handle.get_color()}
            for text, handle in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)]})
    axes[0][0].set_ylabel("achieved sparsity")
    fig.suptitle(title, y=1.03)
    _save(fig, path)
    return drawn


def plot_variants(table: pd.DataFrame, metrics: list[str], panel_of: dict[str, str], line_of: dict[str, str],
                  path: str | Path, title: str, bounds: tuple[str, str] = (" min", " max")) -> None:
    """Many methods made of two parts (an allocation, a pruner with or without a refiner):
    one row of panels per metric, one panel per `panel_of` value (the pruner and refiner),
    one line per `line_of` value (the allocation), in one colour across panels; error bars
    from the `bounds` columns; the dense row (a method in neither map) as a dashed line."""
    panels = list(dict.fromkeys(panel_of.values()))
    lines = list(dict.fromkeys(line_of.values()))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: cycle[i % len(cycle)] for i, name in enumerate(lines)}
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(4.2 * len(panels), 3.3 * len(metrics)),
                             squeeze=False, sharey="row")
    dense = table[~table["method"].isin(list(panel_of))]
    for r, metric in enumerate(metrics):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            for line in lines:
                rows = table[table["method"].map(lambda m: panel_of.get(m) == panel and line_of.get(m) == line)]
                rows = rows.dropna(subset=[metric]).sort_values("target")
                if rows.empty:
                    continue
                err = [rows[metric] - rows[metric + bounds[0]], rows[metric + bounds[1]] - rows[metric]]
                ax.errorbar(rows["target"], rows[metric], yerr=err, marker="o", ms=4, capsize=3, color=colour[line],
                            label=line)
            if not dense.empty and pd.notna(dense[metric].iloc[0]):
                ax.axhline(dense[metric].iloc[0], color="k", ls="--", lw=1, label="dense")
            if metric.startswith("perplexity"):
                ax.set_yscale("log")
            ax.set_title(panel if r == 0 else "")
            ax.set_xlabel("target sparsity")
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(metric)
    handles = _legend_entries(axes.flat, lines + ["dense"])
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    _save(fig, path)


def _legend_entries(axes: Any, order: list[str]) -> dict[str, Any]:
    """One handle per label over all panels, in `order`: a line drawn in some panels only (ATP
    run with one pruner) still needs its legend entry, and a line in every panel needs one."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    return {label: handles[label] for label in sorted(handles, key=lambda lb: order.index(lb) if lb in order
                                                      else len(order))}


def plot_published_vs_ours(rows: pd.DataFrame, metric: str, path: str | Path, title: str,
                           log_scale: bool = False) -> None:
    """The paper's figure redrawn: `metric` against sparsity, a line per method, the published
    values solid and ours dashed in the same colour, dense as a horizontal line; with a single
    sparsity, grouped bars (published, ours) per method. `rows` has the paper page's columns
    (method, sparsity, paper, ours)."""
    dense = rows[rows["method"] == "dense"]
    pruned = rows[rows["method"] != "dense"].assign(x=lambda d: d["sparsity"].astype(float))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if pruned["x"].nunique() > 1:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (method, r) in enumerate(pruned.groupby("method", sort=False)):
            r = r.sort_values("x")
            colour = colours[i % len(colours)]
            ax.plot(r["x"], r["paper"], marker="o", color=colour, label=f"{method} (paper)")
            if r["ours"].notna().any():
                ax.plot(r["x"], r["ours"], marker="s", ls="--", color=colour, label=f"{method} (ours)")
        ax.set_xlabel("sparsity")
    else:
        methods = list(dict.fromkeys(rows["method"]))
        at = range(len(methods))
        paper = [rows.loc[rows["method"] == m, "paper"].iloc[0] for m in methods]
        ours = [rows.loc[rows["method"] == m, "ours"].iloc[0] for m in methods]
        ax.bar([i - 0.2 for i in at], paper, width=0.4, label="paper")
        ax.bar([i + 0.2 for i in at], [0 if pd.isna(v) else v for v in ours], width=0.4, label="ours", hatch="//")
        ax.set_xticks(list(at), methods, rotation=20, ha="right", fontsize=8)
        dense = dense.iloc[0:0]  # dense is a bar here
    for _, d in dense.iterrows():
        ax.axhline(d["paper"], color="k", lw=1, label="dense (paper)")
        if pd.notna(d["ours"]):
            ax.axhline(d["ours"], color="k", lw=1, ls="--", label="dense (ours)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
