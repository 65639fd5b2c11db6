"""Collect every row's metrics, achieved sparsity and stage costs into one table
(CSV + Markdown), metric-vs-sparsity plots and side-by-side sparsity profiles."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ecoflap.models.families import TEXT_EVALS
from ecoflap.reporting.plots import plot_metrics, plot_profiles
from ecoflap.utils.io import atomic_path, read_json, write_text

log = logging.getLogger(__name__)


def _benchmark(path: Path) -> dict[str, float] | None:
    """Wall seconds and peak RSS (MB) from a Snakemake `benchmark:` file."""
    if not path.exists():
        return None
    with open(path) as fh:
        row = next(csv.DictReader(fh, delimiter="\t"))
    rss = row.get("max_rss", "NA")
    return {"s": float(row["s"]), "mem_mb": float(rss) if rss not in ("NA", "-", "") else float("nan")}


def _cost(json_path: Path, bench: Path) -> dict[str, float]:
    """Prefer the Snakemake benchmark (whole job); fall back to the in-process record."""
    measured = _benchmark(bench)
    if measured:
        return measured
    if json_path.exists():
        rt = read_json(json_path).get("runtime", {})
        return {"s": rt.get("wall_s", float("nan")), "mem_mb": rt.get("peak_mem_mb", float("nan"))}
    return {"s": float("nan"), "mem_mb": float("nan")}


def collect_row(results: Path, row: str) -> dict[str, Any]:
    method, label = row.split("/")
    d = results / method / label
    out: dict[str, Any] = {"method": method, "sparsity": label}
    pruning = d / "pruning.json"
    if pruning.exists():
        rep = read_json(pruning)
        out["target"] = rep["target"]
        out["achieved_sparsity"] = rep["global_sparsity"]
        out["mask_sha256"] = rep["mask_sha256"][:12]
    else:
        out["target"] = 0.0
        out["achieved_sparsity"] = 0.0
    ppl = d / "eval" / "perplexity.json"
    if ppl.exists():
        m = read_json(ppl)["metrics"]
        out[f"perplexity ({m['dataset']})"] = m["perplexity"]
        out["ppl_tokens"] = m["tokens"]
    lm = d / "eval" / "lm_eval.json"
    if lm.exists():
        for task, vals in read_json(lm)["metrics"].items():
            out[f"{task} acc"] = vals.get("acc")
            if vals.get("n") is not None:
                out[f"{task} n"] = vals["n"]
    for path in sorted((d / "eval").glob("*.json")):
        if path.stem in TEXT_EVALS:
            continue
        for key, value in read_json(path)["metrics"].items():
            if isinstance(value, (int, float)) and key != "n":
                out[f"{path.stem} {key}"] = value
            elif isinstance(value, dict) and "skipped" in value:
                out[f"{path.stem} {key}"] = float("nan")  # shown empty; the reason is in the eval JSON
        c = _cost(path, d / "benchmarks" / f"{path.stem}.tsv")
        out[f"{path.stem}_s"], out[f"{path.stem}_mem_mb"] = c["s"], c["mem_mb"]
    alloc = d / "allocation.json"
    if alloc.exists():
        scores = read_json(alloc)["provenance"]["config"].get("scores")
        if scores:
            scores = Path(scores)
            c = _cost(scores, scores.parent / "benchmarks" / f"{scores.stem}.tsv")
            out["score_s"], out["score_mem_mb"] = c["s"], c["mem_mb"]
        c = _cost(alloc, d / "benchmarks" / "allocate.tsv")
        out["allocate_s"] = c["s"]
    if pruning.exists():
        c = _cost(pruning, d / "benchmarks" / "prune.tsv")
        out["prune_s"], out["prune_mem_mb"] = c["s"], c["mem_mb"]
    for task in TEXT_EVALS:
        if (d / "eval" / f"{task}.json").exists():  # models without text evaluations get no empty columns
            c = _cost(d / "eval" / f"{task}.json", d / "benchmarks" / f"{task}.tsv")
            out[f"{task}_s"], out[f"{task}_mem_mb"] = c["s"], c["mem_mb"]
    return out


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}")
        return str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def block_profile(layer_sparsity: dict[str, float], layout: dict[str, dict[str, int]]) -> list[float]:
    return [sum(layer_sparsity[k] * n for k, n in layers.items()) / sum(layers.values())
            for layers in layout.values()]


def compare_with_reference(table: pd.DataFrame, reference: dict[str, Any], model: str) -> pd.DataFrame:
    """Ours beside the published numbers: one line per (row, metric) the reference lists."""
    rows = reference.get("models", {}).get(model, {}).get("rows", {})
    lines = []
    for row, published in rows.items():
        method, label = row.split("/")
        ours = table[(table["method"] == method) & (table["sparsity"].astype(str) == label)]
        for metric, paper in published.items():
            value = ours[metric].iloc[0] if len(ours) and metric in ours else float("nan")
            lines.append({"method": method, "sparsity": label, "metric": metric, "ours": value, "paper": paper,
                          "ours - paper": value - paper if pd.notna(value) else float("nan")})
    return pd.DataFrame(lines, columns=["method", "sparsity", "metric", "ours", "paper", "ours - paper"])


def aggregate(results: Path, rows: list[str], out_dir: Path, reference: Path | None = None,
              model: str | None = None) -> pd.DataFrame:
    table = pd.DataFrame([collect_row(results, r) for r in rows])
    table = table.sort_values(["target", "method"], kind="stable").reset_index(drop=True)
    # identity and quality first, then stage costs in pipeline order, the mask hash last
    first = ["method", "sparsity", "target", "achieved_sparsity"]
    evals = sorted({p.stem for r in rows for p in (results / r / "eval").glob("*.json")} - {"perplexity", "lm_eval"})
    quality = [c for c in table.columns if c.startswith("perplexity (") or c.endswith((" acc", " n")) or c == "ppl_tokens"
               or any(c.startswith(f"{e} ") for e in evals)]
    stages = [c for st in ("score", "allocate", "prune", "perplexity", "lm_eval", *evals)
              for c in (f"{st}_s", f"{st}_mem_mb") if c in table.columns]
    table = table[first + quality + stages + [c for c in table.columns if c not in first + quality + stages]]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    notes = []
    if "ppl_tokens" in table:
        notes.append(f"Perplexity over {int(table['ppl_tokens'].max())} evaluation tokens.")
    for col in table.columns:
        if col.endswith(" n"):
            notes.append(f"{col[:-2]}: {int(table[col].max())} items.")
    write_text(out_dir / "summary.md", f"# {results.name}: methods x sparsity\n\n" + _markdown(table)
               + "\n" + " ".join(notes) + "\nTimes in seconds, memory as peak RSS (CPU) in MB per stage job.\n")
    if reference is not None:
        import yaml

        ref = yaml.safe_load(Path(reference).read_text())
        comparison = compare_with_reference(table, ref, model or results.name)
        with atomic_path(out_dir / "comparison.csv") as tmp:
            comparison.to_csv(tmp, index=False)
        write_text(out_dir / "comparison.md", f"# {results.name}: ours vs published\n\nPublished: {ref.get('source', '')}\n\n"
                   + _markdown(comparison))
        log.info("ours vs published:\n%s", comparison.to_string(index=False))
    # one headline panel per vision-language evaluation; the table keeps every metric
    headline = ("accuracy", "CIDEr", "TR@1", "IR@1", "top1")
    metrics = [c for c in table.columns if c.startswith("perplexity (") or c.endswith(" acc")
               or (any(c.startswith(f"{e} ") for e in evals) and c.split(" ", 1)[1] in headline)]
    if metrics:
        plot_metrics(table, metrics, out_dir / "metrics.png", results.name)
    layout = read_json(results / "layout.json")["layout"]
    profiles: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        method, label = r.split("/")
        pruning = results / method / label / "pruning.json"
        if pruning.exists():
            profiles.setdefault(label, {})[method] = block_profile(read_json(pruning)["layer_sparsity"], layout)
    if profiles:
        plot_profiles(profiles, out_dir / "profiles.png", f"{results.name}: achieved sparsity per block")
    log.info("aggregated %d rows into %s", len(table), out_dir)
    return table
