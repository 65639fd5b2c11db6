"""lm-eval-harness on an in-memory model: the real tasks (boolq, hellaswag, ...) online, and
the embedded offline tasks shipped as JSONL + YAML under ecoflap/evaluation/tasks."""
from __future__ import annotations

import glob
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ecoflap.data.corpora import ASSETS
from ecoflap.evaluation.intervals import LEVEL, RESAMPLES, mean_interval

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "tasks"
EMBEDDED_TASKS = {"brown_cloze": ASSETS / "evaluation" / "brown_cloze.jsonl"}
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def embedded_task_dir(tasks: list[str], tmp: Path) -> Path:
    """Copy the embedded task YAMLs with absolute data paths (lm-eval needs them absolute);
    the folder is what `lm_eval --include_path` takes."""
    for task in tasks:
        if task in EMBEDDED_TASKS:
            yaml = (TASK_DIR / f"{task}.yaml").read_text()
            (tmp / f"{task}.yaml").write_text(yaml.replace("__BROWN_CLOZE_JSONL__", str(EMBEDDED_TASKS[task])))
    return tmp


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: list[str], batch_size: int = 8,
                limit: int | None = None, num_fewshot: int = 0, seed: int = 0) -> dict[str, dict[str, float]]:
    try:  # an optional dependency, imported here to fail with the install command below
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError("lm-eval is not installed: pip install 'lm-eval[hf]==0.4.13'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        # indexing lm-eval's ~15k built-in task files takes seconds: skip it when every task is ours
        builtin = any(t not in EMBEDDED_TASKS for t in tasks)
        manager = TaskManager(include_path=str(embedded_task_dir(tasks, Path(tmp))), include_defaults=builtin)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"lm-eval does not know the tasks {unknown}; embedded: {sorted(EMBEDDED_TASKS)}, "
                             f"paper: {list(PAPER_TASKS)}")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        log.info("lm-eval on %s (limit %s, %d-shot)", tasks, limit, num_fewshot)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=True)
    results = task_metrics(out, tasks)
    for task in tasks:  # per-item correctness, in document order (a group: its tasks' in turn), for the interval
        samples = [d for leaf in leaf_tasks(out, task)
                   for d in sorted(out.get("samples", {}).get(leaf, []), key=lambda d: d["doc_id"])]
        if "acc" in results[task] and len(samples) > 1 and all("acc" in d for d in samples):
            items = [float(d["acc"]) for d in samples]
            results[task]["item_acc"] = items
            results[task]["interval"] = list(mean_interval(items))
            results[task]["interval_note"] = (f"{LEVEL:.0%} percentile bootstrap over the {len(items)} items "
                                              f"({RESAMPLES} resamples)")
    return results


def leaf_tasks(out: dict[str, Any], task: str) -> list[str]:
    """The tasks that hold items under `task`: itself, or for a group (mmlu: four groups of 57
    subjects) every task below it, in lm-eval's order."""
    below = out.get("group_subtasks", {}).get(task)
    if not below:
        return [task]
    return [leaf for sub in below for leaf in leaf_tasks(out, sub)]


def metric_name(key: str) -> str:
    """lm-eval's "metric,filter" key as our name: "acc,none" -> "acc", as every table reads it;
    a task scored under several filters (gsm8k: strict-match and flexible-extract) keeps each one,
    "exact_match,strict-match" -> "exact_match[strict-match]", instead of the last overwriting the rest."""
    metric, filter_name = key.split(",", 1)
    return metric if filter_name == "none" else f"{metric}[{filter_name}]"


def task_metrics(out: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """lm-eval's result dict ({"results": {task: {"acc,none": ...}}}) as {task: {"acc": ...}} (`metric_name`).
    A group's metrics are lm-eval's aggregate (mmlu: the mean over all questions, weighted by
    subject size, as the authors' MMLU script reports it); its n counts every item below it."""
    results = {}
    for task in tasks:
        res = out["results"][task]
        results[task] = {metric_name(k): float(v) for k, v in res.items()
                         if "," in k and isinstance(v, (int, float))}
        counts = out.get("n-samples", {})
        leaves = leaf_tasks(out, task)
        results[task]["n"] = sum(int(counts[t]["effective"]) for t in leaves) if all(t in counts for t in leaves) \
            else None
    return results


def lm_eval_cli(model_dir: str | Path, tasks: list[str], batch_size: int = 8, limit: int | None = None,
                num_fewshot: int = 0, seed: int = 0, dtype: str = "float32") -> dict[str, dict[str, float]]:
    """The same evaluation through lm-eval's own command line on a saved checkpoint, as a user
    would run it: the reference our in-process numbers must equal (tests/test_lm_eval_parity.py,
    tools/lm_eval_parity.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        include = embedded_task_dir(tasks, Path(tmp))
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={model_dir},dtype={dtype}", "--tasks", ",".join(tasks),
               "--include_path", str(include), "--batch_size", str(batch_size), "--num_fewshot", str(num_fewshot),
               "--seed", str(seed), "--device", "cpu", "--output_path", str(Path(tmp) / "out")]
        if limit:
            cmd += ["--limit", str(limit)]
        log.info("lm-eval command line: %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"lm_eval exited {done.returncode}: {done.stderr[-2000:]}")
        (found,) = glob.glob(str(Path(tmp) / "out" / "**" / "results_*.json"), recursive=True)
        return task_metrics(json.loads(Path(found).read_text()), tasks)
