"""The paper page: every table the workflow regenerates (config/paper.yaml lists them, one
config each), each published number beside ours where our run has produced it, the difference,
and the paper's figures redrawn from our numbers (published solid, ours dashed).

Our numbers are read from the rows' own result files (results/<model>/<method>/<sparsity>/),
not from a model's summary table, so two configs that share a model (BLIP-2 at 50 % and at 60 %)
both find theirs. A published average over several models (the CLIP table) is compared with
the mean of our models' numbers once all of them exist."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ecoflap.config import model_evaluations
from ecoflap.reporting.aggregate import (check_reference_models, collect_row, evaluation_subsets, metric_names,
                                         subset_of)
from ecoflap.reporting.plots import plot_published_vs_ours
from ecoflap.utils.io import atomic_path, write_text

log = logging.getLogger(__name__)

COLUMNS = ["table", "model", "method", "sparsity", "metric", "paper", "ours", "ours on", "ours - paper"]


def load_manifest(path: str | Path) -> dict[str, Any]:
    manifest = yaml.safe_load(Path(path).read_text())
    for name, table in manifest["tables"].items():
        if not Path(table["config"]).is_file():
            raise FileNotFoundError(f"{path}: table {name} names {table['config']}, which does not exist")
    for name, fig in manifest.get("figures", {}).items():
        unknown = [t for t in fig["tables"] if t not in manifest["tables"]]
        if unknown:
            raise ValueError(f"{path}: figure {name} names tables {unknown} that the manifest does not list")
    return manifest


def table_config(table: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(Path(table["config"]).read_text())


def table_reference(table: dict[str, Any]) -> dict[str, Any]:
    """The published numbers a table's config points at (its `reference:` key)."""
    config = table_config(table)
    if not config.get("reference"):
        return {}
    return yaml.safe_load(Path(config["reference"]).read_text())


def _evaluations(config: dict[str, Any], model: str) -> set[str]:
    """The first words of the metric names a model's evaluations give: "perplexity", each lm-eval
    task ("mmlu acc"), each other entry's name ("vqav2 accuracy")."""
    words: set[str] = set()
    for entry in model_evaluations(config, model):
        words |= set(config["evaluation"]["lm_eval"]["tasks"]) if entry == "lm_eval" else {entry}
    return words


def check_reference_metrics(reference: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """A published metric from an evaluation the model does not run is misspelt: its cell would
    stay empty for good, like a row not run yet."""
    for model, entry in reference.get("models", {}).items():
        runs = _evaluations(config, model)
        unknown = sorted({m for metrics in entry.get("rows", {}).values() for m in metrics
                          if m.split(" ")[0] not in runs})
        if unknown:
            raise ValueError(f"{where}: {model}'s metrics {unknown} come from no evaluation it runs; their first "
                             f"word must be one of {sorted(runs)} (as our summary columns name them)")


class OurNumbers:
    """Our value of one (model, row, metric), read once per row from its result files."""

    def __init__(self, results: Path):
        self.results = results
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(self, model: str, row: str) -> dict[str, Any]:
        key = (model, row)
        if key not in self._rows:
            folder = self.results / model
            self._rows[key] = collect_row(folder, row) if (folder / row).is_dir() else {}
        return self._rows[key]

    def value(self, model: str, row: str, metric: str) -> float:
        self._check_name(model, row, metric)
        v = self.row(model, row).get(metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan

    def _check_name(self, model: str, row: str, metric: str) -> None:
        """A published metric that our row lacks although the evaluation it comes from (its first
        word: perplexity, an lm-eval task, an evaluation entry) has run for that row is misspelt,
        not "not run yet": an error naming the row's metrics."""
        ours = metric_names(self.row(model, row))
        evaluation = metric.split(" ")[0] + " "
        if metric not in ours and any(name.startswith(evaluation) for name in ours):
            raise ValueError(f"published metric {metric!r} of {model} {row}: our results name that evaluation's "
                             f"metrics {[n for n in ours if n.startswith(evaluation)]}; use one of those names")

    def value_ending(self, model: str, row: str, suffix: str) -> float:
        """A model's value of the one metric column ending in ` suffix` (each CLIP-table model is
        evaluated on its own data set, so its column is '<data set> top1')."""
        values = [v for k, v in self.row(model, row).items() if k.endswith(f" {suffix}") and isinstance(v, float)]
        return values[0] if len(values) == 1 else math.nan


def compare(manifest: dict[str, Any], results: Path) -> pd.DataFrame:
    ours = OurNumbers(results)
    lines = []
    for name, table in manifest["tables"].items():
        ref, config = table_reference(table), table_config(table)
        check_reference_models(ref, config["models"], f"table {name}'s reference")
        check_reference_metrics(ref, config, f"table {name}'s reference")
        for model, entry in ref.get("models", {}).items():
            for row, metrics in entry.get("rows", {}).items():
                method, label = row.split("/")
                subsets = evaluation_subsets(results / model / row)
                for metric, paper in metrics.items():
                    value = ours.value(model, row, metric)
                    on = subset_of(metric, subsets) if not math.isnan(value) else ""
                    lines.append((name, model, method, label, metric, paper, value, on))
        averages = ref.get("averages")
        if averages:
            for row, paper in averages["rows"].items():
                method, label = row.split("/")
                values = [ours.value_ending(m, row, averages["metric"]) for m in averages["models"]]
                mean = sum(values) / len(values) if values and not any(math.isnan(v) for v in values) else math.nan
                parts = {s for m in averages["models"] for s in evaluation_subsets(results / m / row).values()}
                on = "" if math.isnan(mean) else "; ".join(sorted(parts)) if parts else "all"
                lines.append((name, "average", method, label, averages["metric"], paper, mean, on))
    df = pd.DataFrame(lines, columns=COLUMNS[:-1])
    df["ours - paper"] = df["ours"] - df["paper"]
    return df


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(out) + "\n"


def write_paper_page(manifest: dict[str, Any], results: Path, out_dir: Path) -> pd.DataFrame:
    """results/paper/index.md, comparison.csv and one PNG per figure; returns the comparison."""
    df = compare(manifest, results)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "comparison.csv") as tmp:
        df.to_csv(tmp, index=False)
    have = int(df["ours"].notna().sum())
    parts = ["# ECoFLaP (ICLR 2024): the paper's numbers and ours\n",
             f"{len(df)} published numbers; ours exist for {have}. Empty cells: not run yet (each table's "
             "config says how to run it, and what data it needs). Published values read off a figure are "
             "approximate (about +/- 0.5 points); each table's source line says which.\n"]
    for name, table in manifest["tables"].items():
        rows = df[df["table"] == name].drop(columns="table")
        source = table_reference(table).get("source", "no published numbers listed")
        parts.append(f"## {table['title']}\n\nConfig: `{table['config']}`. Published: {source}.\n")
        parts.append(_markdown(rows) if len(rows) else "No published numbers for this table.\n")
    for name, fig in manifest.get("figures", {}).items():
        rows = df[df["table"].isin(fig["tables"]) & (df["model"] == fig["model"]) & (df["metric"] == fig["metric"])]
        if rows.empty:
            continue
        png = out_dir / f"{name}.png"
        plot_published_vs_ours(rows, fig["metric"], png, fig["title"], log_scale=fig["metric"].startswith("perplexity"))
        parts.append(f"## Figure: {fig['title']}\n\n![{name}]({png.name})\n")
    write_text(out_dir / "index.md", "\n".join(parts))
    log.info("paper page: %d published numbers, ours for %d -> %s", len(df), have, out_dir / "index.md")
    return df


__all__ = ["compare", "load_manifest", "write_paper_page"]
