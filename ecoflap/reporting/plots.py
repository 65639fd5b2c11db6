"""Plots a person would rather look at than read: allocation profiles and metric curves."""
from __future__ import annotations

from pathlib import Path

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


def plot_metrics(table: pd.DataFrame, metrics: list[str], path: str | Path, title: str) -> None:
    """One panel per metric: metric against target sparsity, a line per method."""
    pruned = table[table["method"] != "dense"]
    dense = table[table["method"] == "dense"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method, rows in pruned.groupby("method", sort=False):
            rows = rows.dropna(subset=["target", metric]).sort_values("target")
            ax.plot(rows["target"], rows[metric], marker="o", label=method)
        if not dense.empty and metric in dense and pd.notna(dense[metric].iloc[0]):
            ax.axhline(dense[metric].iloc[0], color="k", ls="--", lw=1, label="dense")
        if metric.startswith("perplexity"):
            ax.set_yscale("log")
        ax.set_xlabel("target sparsity")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, y=1.03)
    _save(fig, path)


def plot_profiles(profiles: dict[str, dict[str, list[float]]], path: str | Path, title: str) -> None:
    """profiles[sparsity label][method] = achieved sparsity per block; one panel per sparsity."""
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 3.4), squeeze=False, sharey=True)
    for ax, (label, methods) in zip(axes[0], profiles.items()):
        # methods with the same profile (every uniform one) share a line and a legend entry
        same: dict[tuple, list[str]] = {}
        for method, values in methods.items():
            same.setdefault(tuple(round(v, 4) for v in values), []).append(method)
        for values, names in same.items():
            ax.plot(range(len(values)), values, marker=".", label=", ".join(names))
        ax.set_title(f"target {label}")
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("achieved sparsity")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, y=1.03)
    _save(fig, path)
