"""Scoring benchmark: the paper's zeroth-order estimator, the fast default, the paper's
first-order variant and one Wanda pass, on the same model and calibration windows, each
phase in a fresh child process (so peaks do not leak between phases), then the pruned
model's perplexity with each scorer's ECoFLaP allocation over several calibration seeds.
Prints ratios measured side by side in one run."""
from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ecoflap import catalog
from ecoflap.allocation.plan import plan_allocation
from ecoflap.data.calibration import batches, build_calibration
from ecoflap.evaluation.perplexity import evaluation_text, perplexity
from ecoflap.models.base import batch_to, model_layout
from ecoflap.models.loading import load_model
from ecoflap.models.registry import adapter_for
from ecoflap.pruning.engine import prune_sequential
from ecoflap.pruning.methods import Wanda
from ecoflap.utils.io import provenance, write_json, write_text
from ecoflap.utils.runtime import peak_rss_mb, reset_peak_rss, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

# the scoring phases, as config entries of a scorer (kind and options; the rest from the catalog)
SCORING_PHASES = {
    "zo_paper": {"kind": "zeroth_order", "granularity": "layer", "reuse_block_inputs": False, "eps": 1e-3},
    "fast": {"kind": "checkpointed", "granularity": "block", "reduce": "l2"},
    "first_order_paper": {"kind": "first_order", "granularity": "block", "reduce": "abs_wg"},
}


def _phase(kind: str, model_dir: str, ids: torch.Tensor, batch_size: int, device_name: str, threads: int,
           extra: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: load, reset the peak counter, run one phase, report."""
    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    # each phase in the dtype the workflow's `dtype: auto` gives it: the zeroth-order scorer
    # float32 (refused in bfloat16), the others bf16 on a GPU, float32 on CPUs
    scorer_kind = SCORING_PHASES.get(kind, {}).get("kind")
    dtype = resolve_dtype((catalog.SCORERS[scorer_kind].auto_dtype if scorer_kind else None) or "auto", device)
    model, tok = load_model(model_dir, device, dtype)
    adapter = adapter_for(model)
    data = batches(ids, batch_size)
    laid_out = {"layout": model_layout(model, adapter)}
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "dense_inference":
        with torch.no_grad():
            adapter.loss(model, batch_to(data[0], device))
    elif kind == "wanda_pass":
        per_layer = plan_allocation(laid_out, None, {"allocation": "uniform"}, 0.5)["layer_sparsity"]
        prune_sequential(model, adapter, Wanda(), per_layer, data, device)
    elif kind in SCORING_PHASES:
        entry = SCORING_PHASES[kind]
        scorer = catalog.SCORERS[entry["kind"]]
        options = catalog.settings(catalog.SCORERS, entry["kind"], entry)
        seeded = {"seed": extra["seed"]} if scorer.seeded else {}
        out["scores"] = scorer.load()(model, adapter, data, device, **scorer.arguments(options), **seeded)
    elif kind == "quality":
        scored = {"granularity": extra["granularity"], "scores": extra["scores"]}
        plan = plan_allocation(laid_out, scored, {"allocation": "ecoflap"}, extra["target"])  # catalog defaults
        prune_sequential(model, adapter, Wanda(), plan["layer_sparsity"], data, device)
        out["perplexity"] = perplexity(model, tok, evaluation_text(extra["dataset"]), extra["seq_len"], device,
                                       extra["max_windows"], 8)["perplexity"]
    else:
        raise ValueError(kind)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mb"] = peak_rss_mb()
    out["seconds"] = time.perf_counter() - t0
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def _run(kind: str, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        res = pool.submit(_phase, kind, *args).result()
    log.info("%-18s %8.1f s  peak %7.0f MB", kind, res["seconds"], res["peak_mb"])
    return res


def benchmark_scoring(model_dir: str, n_samples: int, seq_len: int, batch_size: int, seeds: list[int],
                      sparsities: list[float], device: str, threads: int, eval_dataset: str, eval_seq_len: int,
                      eval_windows: int, calib_source: str = "austen-emma") -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = {s: build_calibration(tok, calib_source, n_samples, seq_len, s) for s in seeds}
    common = (model_dir, calib[seeds[0]], batch_size, device, threads)
    cost = {k: _run(k, *common, {"seed": seeds[0]}) for k in
            ("dense_inference", "wanda_pass", "fast", "first_order_paper", "zo_paper")}
    ratios = {
        "time(paper) / time(fast)": cost["zo_paper"]["seconds"] / cost["fast"]["seconds"],
        "time(fast) / time(wanda pass)": cost["fast"]["seconds"] / cost["wanda_pass"]["seconds"],
        "peak(fast) / peak(dense inference)": cost["fast"]["peak_mb"] / cost["dense_inference"]["peak_mb"],
        "peak(first-order paper) / peak(fast)": cost["first_order_paper"]["peak_mb"] / cost["fast"]["peak_mb"],
    }
    quality: dict[str, dict[str, list[float]]] = {}
    for scorer, kind, gran in (("paper", "zo_paper", "layer"), ("fast", "fast", "block")):
        for s in seeds:
            scores = cost[kind]["scores"] if s == seeds[0] else \
                _run(kind, model_dir, calib[s], batch_size, device, threads, {"seed": s})["scores"]
            for target in sparsities:
                q = _run("quality", model_dir, calib[s], batch_size, device, threads,
                         {"scores": scores, "granularity": gran, "target": target, "dataset": eval_dataset,
                          "seq_len": eval_seq_len, "max_windows": eval_windows})
                quality.setdefault(scorer, {}).setdefault(f"{target:g}", []).append(q["perplexity"])
    summary = {
        "settings": {"model": model_dir, "n_samples": n_samples, "seq_len": seq_len, "batch_size": batch_size,
                     "seeds": seeds, "device": device, "threads": threads},
        "cost": {k: {"seconds": v["seconds"], "peak_mb": v["peak_mb"], "dtype": v["dtype"]} for k, v in cost.items()},
        "ratios": ratios,
        "perplexity": {sc: {t: {"values": v, "mean": statistics.mean(v),
                                "stdev": statistics.stdev(v) if len(v) > 1 else 0.0} for t, v in d.items()}
                       for sc, d in quality.items()},
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["phase                 seconds   peak MB  dtype"]
    lines += [f"{k:<20} {v['seconds']:8.1f} {v['peak_mb']:9.0f}  {v.get('dtype', '')}" for k, v in summary["cost"].items()]
    lines += [""] + [f"{k:<40} {v:8.2f}" for k, v in summary["ratios"].items()] + ["", "perplexity (mean ± sd over seeds)"]
    for scorer, d in summary["perplexity"].items():
        for t, v in d.items():
            vals = ", ".join(f"{x:.1f}" for x in v["values"])
            lines.append(f"  {scorer:<6} @ {t}: {v['mean']:.1f} ± {v['stdev']:.1f}   [{vals}]")
    return "\n".join(lines)


def write_summary(path: str | Path, summary: dict[str, Any]) -> None:
    summary["provenance"] = provenance(summary["settings"])
    write_json(path, summary)
    write_text(Path(path).with_suffix(".txt"), format_summary(summary) + "\n")
