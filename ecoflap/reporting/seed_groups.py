"""One summary over replicates of a model that differ only in seed (config `seed_groups`):
each metric's mean, standard deviation and range over the seeds, each coarse stage's cost
as a ratio to one Wanda pass, where each allocation wins, ties or loses against the others
beyond the seed spread, and the per-block sparsity each allocation chose.

Reads each member's results/<model>/summary/summary.csv (the aggregate rule's table, one
row per method and sparsity) and pruning reports, so it adds no measurement of its own."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ecoflap.reporting.aggregate import block_profile, metric_names
from ecoflap.reporting.plots import plot_profiles, plot_variants
from ecoflap.utils.io import atomic_path, read_json, write_text

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("perplexity",)
SEEDS = " seeds"  # suffix of the column counting a metric's values over the seeds


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The measurements of a member's summary (the rest are identity, costs, hashes)."""
    return [c for c in metric_names(table.columns) if pd.api.types.is_numeric_dtype(table[c])]


def group_metrics(members: dict[str, pd.DataFrame]) -> list[str]:
    """Every member's metrics, not only the first member's: a metric one seed lacks is still shown."""
    return metric_columns(pd.concat(members.values(), ignore_index=True))


def spread(members: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per method and sparsity: mean, sd, min and max of every metric over the members, and how
    many members have a value (`<metric> seeds`): a missing seed (a skipped or absent evaluation)
    is left out of the mean, so the count says over how many seeds it is taken."""
    stacked = pd.concat([t.assign(seed_model=m) for m, t in members.items()], ignore_index=True)
    metrics = group_metrics(members)
    rows = []
    for (method, sparsity), g in stacked.groupby(["method", "sparsity"], sort=False):
        row: dict[str, Any] = {"method": method, "sparsity": sparsity, "target": g["target"].iloc[0],
                               "seeds": g["seed_model"].nunique()}
        for m in metrics:
            v = g[m].dropna()
            row.update({m: v.mean(), f"{m} sd": v.std(ddof=1) if len(v) > 1 else float("nan"),
                        f"{m} min": v.min(), f"{m} max": v.max(), m + SEEDS: len(v)})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["target", "method"], kind="stable").reset_index(drop=True)


def _fewer_seeds(row: pd.Series, metric: str, members: int) -> str:
    """A cell's note where some seeds have no value of the metric: " (2 of 3 seeds)"; else empty."""
    n = int(row[metric + SEEDS])
    return f" ({n} of {members} seeds)" if n < members else ""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def coarse_costs(results: Path, members: list[str], methods: dict[str, dict[str, Any]], scorers: dict[str, Any],
                 wanda_method: str | None) -> pd.DataFrame:
    """Each scorer's cost over one uniform-Wanda pruning pass's, mean over the members (and,
    for Wanda, the sparsities), two ways: the computation alone (`compute_s` of the scores
    file and of the pruning report: no start-up, loading or saving) and whole Snakemake jobs
    (their benchmark files: what a user waits for); plus a searching scorer's runs."""
    def job_s(bench: Path) -> list[float]:
        return [float(pd.read_csv(bench, sep="\t")["s"].iloc[0])] if bench.exists() else []

    wanda_compute, wanda_job = [], []
    for model in members:
        for report in (results / model / wanda_method).glob("*/pruning.json") if wanda_method else ():
            pruned = read_json(report)
            wanda_compute += [pruned["compute_s"]] if "compute_s" in pruned else []
            wanda_job += job_s(report.parent / "benchmarks" / "prune.tsv")
    rows = []
    for scorer, entry in scorers.items():
        if not any(m.get("scorer") == scorer for m in methods.values()):
            continue
        compute, job, runs = [], [], []
        for model in members:
            scored = results / model / "scores" / f"{scorer}.json"
            if scored.exists():
                rec = read_json(scored)
                compute += [rec["compute_s"]] if "compute_s" in rec else []
                runs += [rec["record"]["runs"]] if "record" in rec else []
            job += job_s(results / model / "scores" / "benchmarks" / f"{scorer}.tsv")
        if not job and not compute:
            continue
        rows.append({"scorer": scorer, "kind": entry["kind"],
                     "compute_s": _mean(compute), "wanda_compute_s": _mean(wanda_compute),
                     "x_wanda_compute": _mean(compute) / _mean(wanda_compute),
                     "job_s": _mean(job), "wanda_job_s": _mean(wanda_job), "x_wanda_job": _mean(job) / _mean(wanda_job),
                     "search_runs": runs[0] if runs else None})
    return pd.DataFrame(rows)


def _verdict(a: pd.Series, b: pd.Series, metric: str, lower: bool) -> str:
    """win or loss when the two ranges over the seeds do not overlap, else tie; n/a when either
    side has no value (nothing to compare is not a tie)."""
    if pd.isna(a[metric]) or pd.isna(b[metric]):
        return "n/a"
    a_lo, a_hi, b_lo, b_hi = a[f"{metric} min"], a[f"{metric} max"], b[f"{metric} min"], b[f"{metric} max"]
    better = a_hi < b_lo if lower else a_lo > b_hi
    worse = a_lo > b_hi if lower else a_hi < b_lo
    return "win" if better else "loss" if worse else "tie"


def verdicts(table: pd.DataFrame, methods: dict[str, dict[str, Any]], metric: str) -> pd.DataFrame:
    """Every ECoFLaP method against every other allocation with the same pruner and refiner,
    at each sparsity: win, loss, tie or n/a (see _verdict)."""
    lower = metric.startswith(LOWER_IS_BETTER)
    rows = []
    for _, a in table.iterrows():
        ma = methods.get(a["method"], {})
        if ma.get("allocation") != "ecoflap":
            continue
        for _, b in table[table["sparsity"] == a["sparsity"]].iterrows():
            mb = methods.get(b["method"], {})
            if b["method"] == a["method"] or mb.get("pruner") != ma.get("pruner") \
                    or mb.get("refine", "none") != ma.get("refine", "none") or mb.get("allocation") == "ecoflap":
                continue
            rows.append({"sparsity": a["sparsity"], "method": a["method"], "versus": b["method"],
                         "ratio of means" if lower else "difference of means":
                             a[metric] / b[metric] if lower else a[metric] - b[metric],
                         "verdict": _verdict(a, b, metric, lower)})
    return pd.DataFrame(rows)


def _allocation_label(method: dict[str, Any]) -> str:
    """uniform, owl, ..., or ECoFLaP with its scorer: "ecoflap (zo)"."""
    allocation = method.get("allocation", "uniform")
    return f"{allocation} ({method['scorer']})" if allocation == "ecoflap" else allocation


def _variant(method: dict[str, Any]) -> str:
    """The fine stage: the pruner, and its refiner if any ("wanda + dsnot")."""
    return method["pruner"] + ("" if method.get("refine", "none") == "none" else f" + {method['refine']}")


def allocation_labels(methods: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each pruned method's row (at a glance) and line (plot) label: its allocation, or its own
    name where two methods with the same fine stage would share that label (OWL at two lambdas),
    as one label for both would merge them into one row and one line."""
    pruned = {n: m for n, m in methods.items() if m.get("pruner", "none") != "none"}
    taken: dict[tuple[str, str], list[str]] = {}
    for name, m in pruned.items():
        taken.setdefault((_allocation_label(m), _variant(m)), []).append(name)
    return {name: _allocation_label(m) if len(taken[(_allocation_label(m), _variant(m))]) == 1 else name
            for name, m in pruned.items()}


def at_a_glance(table: pd.DataFrame, methods: dict[str, dict[str, Any]], metric: str, members: int) -> pd.DataFrame:
    """One row per allocation (ECoFLaP named with its scorer; see allocation_labels) and
    sparsity, one column per pruner and refiner: the metric's mean ± sd over the seeds, with
    "(2 of 3 seeds)" where some of the `members` seeds have no value."""
    labels = allocation_labels(methods)
    cells: dict[tuple[str, str], dict[str, str]] = {}
    order = {name: i for i, name in enumerate(methods)}  # rows in the config's order of methods
    for _, row in sorted(table.iterrows(), key=lambda r: (r[1]["target"], order.get(r[1]["method"], len(order)))):
        m = methods.get(row["method"], {})
        if m.get("pruner", "none") == "none" or pd.isna(row[metric]):
            continue
        cells.setdefault((str(row["sparsity"]), labels[row["method"]]), {})[_variant(m)] = \
            f"{row[metric]:.4g} ± {row[f'{metric} sd']:.2g}" + _fewer_seeds(row, metric, members)
    return pd.DataFrame([{"sparsity": sp, "allocation": label, **c} for (sp, label), c in cells.items()]).fillna("")


def _cell(row: pd.Series, metric: str, members: int) -> str:
    if pd.isna(row[metric]):
        return ""
    return f"{row[metric]:.4g} ± {row[f'{metric} sd']:.2g} [{row[f'{metric} min']:.4g}, {row[f'{metric} max']:.4g}]" \
        + _fewer_seeds(row, metric, members)


def _markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |\n"
                          for r in df.itertuples(index=False))


def seed_group_summary(results: Path, group: str, members: list[str], run_config: dict[str, Any],
                       out_dir: Path) -> pd.DataFrame:
    methods, scorers = run_config["methods"], run_config.get("scorers", {})
    # sparsity labels as the folders name them ("0.5", "2of4", "0" for dense)
    tables = {m: pd.read_csv(results / m / "summary" / "summary.csv", dtype={"sparsity": str}) for m in members}
    table = spread(tables)
    metrics = group_metrics(tables)
    seeds = {m: run_config["models"][m].get("seed", run_config.get("seed", 0)) for m in members}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    wanda = next((name for name, m in methods.items() if m.get("pruner") == "wanda"
                  and m.get("allocation", "uniform") == "uniform" and m.get("refine", "none") == "none"), None)
    costs = coarse_costs(results, members, methods, scorers, wanda)
    with atomic_path(out_dir / "costs.csv") as tmp:
        costs.to_csv(tmp, index=False)
    shown = pd.DataFrame({"method": table["method"], "sparsity": table["sparsity"], "seeds": table["seeds"],
                          **{m: [_cell(r, m, len(members)) for _, r in table.iterrows()] for m in metrics}})
    text = [f"# {group}: mean ± sd [min, max] over {len(members)} seeds\n",
            "Seeds: " + ", ".join(f"{m} (seed {s})" for m, s in seeds.items()) + ". Each seed draws its own "
            "calibration windows (and the scorers' random directions); the model's weights and the evaluation "
            "data are the same. A seed without a value (a skipped or missing evaluation) is left out of its cell, "
            "which then says over how many seeds it is taken: \"(2 of 3 seeds)\".\n"]
    for metric in metrics:
        glance = at_a_glance(table, methods, metric, len(members))
        if not glance.empty:
            dense = table[table["method"].map(lambda n: methods.get(n, {}).get("pruner") == "none")]
            text += [f"\n## {metric} at a glance (mean ± sd)"
                     + (f"; dense {dense[metric].iloc[0]:.4g}{_fewer_seeds(dense.iloc[0], metric, len(members))}"
                        if len(dense) else "") + "\n", _markdown(glance)]
    text += ["\n## Every row\n", _markdown(shown)]
    if not costs.empty:
        text += ["\n## Coarse-stage cost, as a ratio to one Wanda pass\n",
                 f"Each scorer against the uniform Wanda pruning pass ({wanda}), mean over seeds: `compute` is the "
                 "computation alone (no start-up, loading or saving), `job` whole Snakemake jobs. A search runs "
                 "once for all sparsities.\n", _markdown(costs)]
    for metric in metrics:
        v = verdicts(table, methods, metric)
        if v.empty:
            continue
        with atomic_path(out_dir / f"verdicts {metric}.csv".replace(" ", "_").replace("(", "").replace(")", "")) \
                as tmp:
            v.to_csv(tmp, index=False)
        text += [f"\n## {metric}: ECoFLaP against the other allocations beyond the seed spread\n",
                 "win / loss: the two methods' ranges over the seeds do not overlap; tie: they do; n/a: either "
                 "has no value (not counted). Same pruner and refiner, same sparsity.\n", _markdown(v)]
        counted = v[v["verdict"] != "n/a"]
        if not counted.empty:
            counts = counted.pivot_table(index=["method"], columns="verdict", values="versus", aggfunc="count",
                                         fill_value=0)
            text += ["\nCounts:\n", _markdown(counts.reset_index())]
    write_text(out_dir / "summary.md", "\n".join(text) + "\n")
    pruned = {n: m for n, m in methods.items() if m.get("pruner", "none") != "none"}
    plot_variants(table, metrics, {n: _variant(m) for n, m in pruned.items()}, allocation_labels(methods),
                  out_dir / "metrics.png",
                  f"{group}: mean over {len(members)} seeds, bars from the lowest to the highest seed")
    layout = read_json(results / members[0] / "layout.json")["layout"]
    profiles: dict[str, dict[str, list[float]]] = {}
    for name, m in methods.items():  # the allocation each method chose; one pruner's rows suffice
        if m.get("pruner") not in ("wanda", None) or m.get("refine", "none") != "none":
            continue
        for label in table["sparsity"].astype(str).unique():
            reports = [results / member / name / label / "pruning.json" for member in members]
            per_seed = [block_profile(read_json(p)["layer_sparsity"], layout) for p in reports if p.exists()]
            if per_seed:
                profiles.setdefault(label, {})[name] = [sum(v) / len(v) for v in zip(*per_seed)]
    if profiles:
        plot_profiles(profiles, out_dir / "profiles.png", f"{group}: per-block sparsity each allocation chose "
                      "(Wanda rows, mean over seeds)")
    log.info("seed group %s: %d rows over %d seeds into %s", group, len(table), len(members), out_dir)
    return table
