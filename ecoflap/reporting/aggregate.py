"""Collect every row's metrics, achieved sparsity and stage costs into one table
(CSV + Markdown), metric-vs-sparsity plots and side-by-side sparsity profiles."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml


from ecoflap.catalog import TEXT_EVALS
from ecoflap.evaluation.intervals import paired_difference_interval, paired_ratio_interval
from ecoflap.reporting.plots import plot_metrics, plot_profiles
from ecoflap.utils.io import atomic_path, read_json, write_text
from ecoflap.utils.sparsity import weighted_sparsity
from ecoflap.utils.validate import check_pruning_report

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


def _check_evaluated_checkpoint(row_dir: Path, pruned: str | None) -> None:
    """Every evaluation of a pruned row must have read the checkpoint its pruning.json describes:
    a row pruned again since (by hand, or a run that redid the prune but not the evaluations)
    would otherwise pair the new masks and sparsity with the old model's metrics."""
    if not pruned:
        return
    for path in sorted((row_dir / "eval").glob("*.json")):
        evaluated = read_json(path).get("provenance", {}).get("input_sha256", {}).get("model")
        if evaluated and evaluated != pruned:
            raise ValueError(f"{path} evaluated checkpoint {evaluated[:12]}, but {row_dir / 'pruning.json'} describes "
                             f"{pruned[:12]} (pruned again since): rerun that evaluation (snakemake --forcerun "
                             f"{'evaluate_text' if path.stem in TEXT_EVALS else 'evaluate'} with its output as the "
                             "target), or delete it")


def collect_row(results: Path, row: str) -> dict[str, Any]:
    method, label = row.split("/")
    d = results / method / label
    out: dict[str, Any] = {"method": method, "sparsity": label}
    pruning = d / "pruning.json"
    if pruning.exists():
        rep = check_pruning_report(read_json(pruning), pruning)
        _check_evaluated_checkpoint(d, rep.get("checkpoint_sha256"))
        out["target"] = rep["target"]
        out["achieved_sparsity"] = rep["global_sparsity"]
        out["mask_sha256"] = rep["mask_sha256"][:12]
    else:
        out["target"] = 0.0
        out["achieved_sparsity"] = 0.0
    ppl = d / "eval" / "perplexity.json"
    if ppl.exists():
        m = read_json(ppl)["metrics"]
        name = f"perplexity ({m['dataset']})"
        out[name] = m["perplexity"]
        _interval(out, name, m.get("interval"))
        out["ppl_tokens"] = m["tokens"]
    lm = d / "eval" / "lm_eval.json"
    if lm.exists():
        for task, vals in read_json(lm)["metrics"].items():
            out[f"{task} acc"] = vals.get("acc")
            _interval(out, f"{task} acc", vals.get("interval"))
            if vals.get("n") is not None:
                out[f"{task} n"] = vals["n"]
    for path in sorted((d / "eval").glob("*.json")):
        if path.stem in TEXT_EVALS:
            continue
        for key, value in read_json(path)["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "n" \
                    and not key.endswith(" n"):
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
            # the text evaluations share one job: each entry's own wall time and peak, from its record
            c = _cost(d / "eval" / f"{task}.json", d / "benchmarks" / f"{task}.tsv")
            out[f"{task}_s"], out[f"{task}_mem_mb"] = c["s"], c["mem_mb"]
    job = _benchmark(d / "benchmarks" / "evaluate_text.tsv")
    if job:  # the whole job: process start, imports, model load and every text evaluation
        out["evaluate_text_s"], out["evaluate_text_mem_mb"] = job["s"], job["mem_mb"]
    return out


LO, HI = " lo95", " hi95"  # suffixes of a metric's interval columns


def _interval(out: dict[str, Any], name: str, interval: list[float] | None) -> None:
    if interval:
        out[name + LO], out[name + HI] = interval


def _per_item(results: Path, row: str) -> dict[str, list[float]]:
    """The per-window losses and per-item scores behind a row's metrics (for paired comparisons)."""
    d = results / row / "eval"
    items: dict[str, list[float]] = {}
    if (d / "perplexity.json").exists():
        m = read_json(d / "perplexity.json")["metrics"]
        if m.get("window_nll"):
            items[f"perplexity ({m['dataset']})"] = m["window_nll"]
    if (d / "lm_eval.json").exists():
        for task, vals in read_json(d / "lm_eval.json")["metrics"].items():
            if vals.get("item_acc"):
                items[f"{task} acc"] = vals["item_acc"]
    return items


def pairwise_differences(table: pd.DataFrame, results: Path, rows: list[str]) -> pd.DataFrame:
    """Every pair of pruned methods at the same sparsity, per metric with per-item values: the
    paired bootstrap interval of the perplexity ratio (or accuracy difference) over the same
    windows (items), and whether the two rows' own intervals overlap."""
    per_item = {r: _per_item(results, r) for r in rows}
    lines = []
    for label in sorted({r.split("/")[1] for r in rows if not r.startswith("dense/")}):
        methods = [r for r in rows if r.split("/")[1] == label]
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                for metric in sorted(set(per_item[a]) & set(per_item[b])):
                    x, y = per_item[a][metric], per_item[b][metric]
                    if len(x) != len(y):
                        continue
                    ppl = metric.startswith("perplexity")
                    lo, hi = (paired_ratio_interval if ppl else paired_difference_interval)(x, y)
                    ra = table[(table["method"] == a.split("/")[0]) & (table["sparsity"].astype(str) == label)].iloc[0]
                    rb = table[(table["method"] == b.split("/")[0]) & (table["sparsity"].astype(str) == label)].iloc[0]
                    apart = ra[metric + HI] < rb[metric + LO] or rb[metric + HI] < ra[metric + LO] \
                        if metric + LO in table else float("nan")
                    point = ra[metric] / rb[metric] if ppl else ra[metric] - rb[metric]
                    lines.append({"sparsity": label, "metric": metric, "a": a.split("/")[0], "b": b.split("/")[0],
                                  "statistic": "a / b" if ppl else "a - b", "value": point, "paired lo95": lo,
                                  "paired hi95": hi, "beyond paired interval": not (lo <= (1.0 if ppl else 0.0) <= hi),
                                  "own intervals apart": apart})
    return pd.DataFrame(lines)


def _with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """For reading: each metric as "value [lo, hi]", its interval columns folded in."""
    shown = table.copy()
    for col in [c for c in table.columns if c + LO in table.columns]:
        def cell(row, col=col):
            if pd.isna(row[col]):
                return ""
            if pd.isna(row[col + LO]):
                return _fmt(row[col])
            return f"{_fmt(row[col])} [{_fmt(row[col + LO])}, {_fmt(row[col + HI])}]"
        shown[col] = table.apply(cell, axis=1)
    return shown.drop(columns=[c for c in table.columns if c.endswith((LO, HI))])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}")
    return str(v)


def _markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _interval_notes(eval_dir: Path) -> list[str]:
    notes = []
    for path in eval_dir.glob("*.json"):
        metrics = read_json(path)["metrics"]
        for vals in [metrics, *[v for v in metrics.values() if isinstance(v, dict)]]:
            if vals.get("interval_note"):
                notes.append(f"{path.stem}: {vals['interval_note'].split(' (')[0]}")
    return notes


def block_profile(layer_sparsity: dict[str, float], layout: dict[str, dict[str, int]]) -> list[float]:
    """Each block's achieved sparsity; a block the method left out (`submodels:`) is dense."""
    return [weighted_sparsity({k: layer_sparsity.get(k, 0.0) for k in layers}, layers) for layers in layout.values()]


# the columns of a summary that are not measurements: identity, hashes, token counts
NOT_METRICS = ("method", "sparsity", "target", "achieved_sparsity", "ppl_tokens", "mask_sha256")


def metric_names(columns: Any) -> list[str]:
    """The measurements among a summary's columns (or a row's keys): not identity, stage costs
    (`_s`, `_mem_mb`), item counts (` n`) or interval bounds."""
    return [c for c in columns if c not in NOT_METRICS and not c.endswith(("_s", "_mem_mb", " n", LO, HI))]


def reference_models(reference: dict[str, Any]) -> list[str]:
    """The models a published-numbers YAML covers: per row (`models:`) or in an average."""
    return [*reference.get("models", {}), *reference.get("averages", {}).get("models", [])]


def check_reference_models(reference: dict[str, Any], models: Any, where: str) -> None:
    """A reference model that is none of the config's models is misspelt: its numbers would never
    meet ours, and the comparison would look like one that has not run yet."""
    unknown = [m for m in reference_models(reference) if m not in models]
    if unknown:
        raise ValueError(f"{where} lists models {unknown} that the config does not have; spell them as the "
                         f"config's models: {sorted(models)}")


def _check_reference_metrics(table: pd.DataFrame, rows: dict[str, dict[str, float]], model: str) -> None:
    """A published metric our table has no column for is misspelt (a row not run yet still has the
    column, from the other rows), so it is an error rather than an empty cell."""
    ours = metric_names(table.columns)
    unknown = sorted({metric for published in rows.values() for metric in published if metric not in ours})
    if unknown:
        raise ValueError(f"the reference's {model} rows name metrics {unknown} that our table lacks; use our "
                         f"column names: {ours}")


def evaluation_subsets(row_dir: Path) -> dict[str, str]:
    """{evaluation: "first N ..."} for each evaluation of a row that ran on part of its data set
    (`limit`, perplexity's `max_windows`), keyed as its metrics begin (an entry's name, an
    lm-eval task, "perplexity"): a number from a subset must not pass for the published one."""
    subsets: dict[str, str] = {}
    for path in sorted((Path(row_dir) / "eval").glob("*.json")):
        result = read_json(path)
        cfg = result.get("provenance", {}).get("config", {})
        if path.stem == "perplexity" and cfg.get("max_windows"):
            subsets["perplexity"] = f"first {cfg['max_windows']} windows"
        elif path.stem == "lm_eval" and cfg.get("limit"):
            subsets.update({task: f"first {cfg['limit']} items" for task in result.get("metrics", {})})
        elif path.stem not in TEXT_EVALS and cfg.get("limit"):
            subsets[path.stem] = f"first {cfg['limit']} items"
    return subsets


def subset_of(metric: str, subsets: dict[str, str]) -> str:
    """What part of its data set a metric was computed on: "all", or the subset's description."""
    return subsets.get(metric.split(" ")[0], "all")


def compare_with_reference(table: pd.DataFrame, reference: dict[str, Any], model: str,
                           subsets: dict[str, dict[str, str]] | None = None) -> pd.DataFrame:
    """Ours beside the published numbers: one line per (row, metric) the reference lists. A
    model the reference does not cover, or a metric our table has no column for, is an error;
    a row we have not run yet is an empty cell. `subsets` ({row: evaluation_subsets}) fills
    "ours on": "all", or the part of the data set ours was computed on."""
    if model not in reference_models(reference):
        raise ValueError(f"the reference has no model {model!r}; it lists {reference_models(reference)} (fix "
                         "the model's key in the reference, or --model-name)")
    rows = reference.get("models", {}).get(model, {}).get("rows", {})
    _check_reference_metrics(table, rows, model)
    lines = []
    for row, published in rows.items():
        method, label = row.split("/")
        ours = table[(table["method"] == method) & (table["sparsity"].astype(str) == label)]
        for metric, paper in published.items():
            value = ours[metric].iloc[0] if len(ours) and metric in ours else float("nan")
            lines.append({"method": method, "sparsity": label, "metric": metric, "ours": value, "paper": paper,
                          "ours - paper": value - paper if pd.notna(value) else float("nan"),
                          "ours on": subset_of(metric, (subsets or {}).get(row, {})) if pd.notna(value) else ""})
    return pd.DataFrame(lines, columns=["method", "sparsity", "metric", "ours", "paper", "ours - paper", "ours on"])


def _write_comparison(table: pd.DataFrame, ref: dict[str, Any], reference: Path, model: str, results: Path,
                      out_dir: Path, run_config: dict[str, Any] | None) -> None:
    """comparison.csv and .md. With the run's config known, every reference model must be one of
    its models, and a model of the config the reference does not cover gets no comparison (the
    published numbers are another model's); without it, the model must be in the reference."""
    if run_config is not None:
        check_reference_models(ref, run_config["models"], str(reference))
        if model not in reference_models(ref):
            log.info("%s: no published numbers for this model in %s", model, reference)
            return
    rows = ref.get("models", {}).get(model, {}).get("rows", {})
    comparison = compare_with_reference(table, ref, model, {row: evaluation_subsets(results / row) for row in rows})
    with atomic_path(out_dir / "comparison.csv") as tmp:
        comparison.to_csv(tmp, index=False)
    write_text(out_dir / "comparison.md", f"# {results.name}: ours vs published\n\nPublished: {ref.get('source', '')}\n\n"
               + _markdown(comparison))
    log.info("ours vs published:\n%s", comparison.to_string(index=False))


def aggregate(results: Path, rows: list[str], out_dir: Path, reference: Path | None = None,
              model: str | None = None, run_config: dict[str, Any] | None = None) -> pd.DataFrame:
    table = pd.DataFrame([collect_row(results, r) for r in rows])
    table = table.sort_values(["target", "method"], kind="stable").reset_index(drop=True)
    # identity and quality first, then stage costs in pipeline order, the mask hash last
    first = ["method", "sparsity", "target", "achieved_sparsity"]
    evals = sorted({p.stem for r in rows for p in (results / r / "eval").glob("*.json")} - {"perplexity", "lm_eval"})
    quality = [c for c in table.columns if c.startswith("perplexity (") or c.endswith((" acc", " n", LO, HI))
               or c == "ppl_tokens" or any(c.startswith(f"{e} ") for e in evals)]
    stages = [c for st in ("score", "allocate", "prune", "evaluate_text", "perplexity", "lm_eval", *evals)
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
    where = sorted({f"{m['cpu']} ({m['cores']} cores)" for r in rows for p in (results / r / "eval").glob("*.json")
                    if (m := read_json(p)["provenance"].get("machine"))})
    if where:
        notes.append(f"Evaluated on {', '.join(where)}; masks and metrics are bit-identical on the same machine and "
                     "seed, and move in the last digits (a few percent for perplexity at high sparsity) across CPUs.")
    interval_notes = sorted({n for r in rows for n in _interval_notes(results / r / "eval")})
    if interval_notes:
        notes.append("In brackets: " + "; ".join(interval_notes) + ".")
    write_text(out_dir / "summary.md", f"# {results.name}: methods x sparsity\n\n" + _markdown(_with_intervals(table))
               + "\n" + " ".join(notes) + "\nTimes in seconds, memory as peak RSS (CPU) in MB per stage job "
               "(evaluate_text: the one job that runs every text evaluation of a row; perplexity_s and lm_eval_s: "
               "each evaluation's own share of it).\n")
    differences = pairwise_differences(table, results, rows)
    if not differences.empty:
        with atomic_path(out_dir / "differences.csv") as tmp:
            differences.to_csv(tmp, index=False)
        write_text(out_dir / "differences.md", f"# {results.name}: which differences are beyond the noise\n\n"
                   "Each pair of methods at one sparsity: the ratio of perplexities (or the difference of "
                   "accuracies) with its 95 % paired bootstrap interval over the same evaluation windows (items), "
                   "and whether the two rows' own 95 % intervals are apart.\n\n" + _markdown(differences))
    if reference is not None:
        ref = yaml.safe_load(Path(reference).read_text())
        _write_comparison(table, ref, reference, model or results.name, results, out_dir, run_config)
    # one headline panel per vision-language evaluation; the table keeps every metric
    headline = ("accuracy", "CIDEr", "TR@1", "IR@1", "top1")
    metrics = [c for c in table.columns if (c.startswith("perplexity (") and not c.endswith((LO, HI)))
               or c.endswith(" acc") or (any(c.startswith(f"{e} ") for e in evals) and c.split(" ", 1)[1] in headline)]
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
    write_text(out_dir / "environment.txt", environment_text(results, rows, run_config))
    log.info("aggregated %d rows into %s", len(table), out_dir)
    return table


def environment_text(results: Path, rows: list[str], run_config: dict[str, Any] | None = None) -> str:
    """Versions, commits, machines and seeds of every result a summary is built from, and the
    workflow configuration that asked for them."""
    seen: dict[str, set[str]] = {"versions": set(), "git commit": set(), "machine": set(), "seed": set()}
    for path in sorted(p for r in rows for p in (results / r / "eval").glob("*.json")) + \
            sorted(results.glob("scores/*.json")) + [results / r / "pruning.json" for r in rows]:
        if not path.exists():
            continue
        prov = read_json(path).get("provenance", {})
        seen["versions"].add(", ".join(f"{k} {v}" for k, v in sorted(prov.get("versions", {}).items()) if v))
        seen["git commit"].add(str(prov.get("git_commit")))
        m = prov.get("machine") or {}
        where = f"{m.get('host')}: {m.get('cpu')} ({m.get('cores')} cores), executor {m.get('executor', 'local')}"
        if m.get("slurm_job_id"):
            where += f", SLURM job {m['slurm_job_id']}"
        if m.get("gpus"):
            where += ", " + "; ".join(f"{g['name']} ({g['memory_gb']} GB, driver {g['driver']}, CUDA {g['cuda']})"
                                      for g in m["gpus"])
        if m.get("gpu_lease"):
            where += f", GPU lease {m['gpu_lease']['devices']}"
        seen["machine"].add(where)
        settings = prov.get("config") or {}
        if "seed" in settings:
            seen["seed"].add(str(settings["seed"]))
    lines = [f"{results.name}: provenance of the {len(rows)} rows' results", ""]
    for key, values in seen.items():
        lines.append(f"{key}:")
        lines += [f"  {v}" for v in sorted(values) if v]
    if run_config is not None:
        lines += ["", "workflow configuration:", yaml.safe_dump(run_config, sort_keys=False)]
    return "\n".join(lines) + "\n"
