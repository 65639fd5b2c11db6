"""The lm-eval number the pipeline reports equals what lm-eval's own command line prints for the
same saved checkpoint, task, shots, limit and seed (tools/lm_eval_parity.py runs the same check
on any checkpoint, e.g. the embedded model's pruned rows)."""
from __future__ import annotations

import json
import subprocess
import sys

from ecoflap.evaluation.harness import lm_eval_cli, task_metrics


def test_pipeline_lm_eval_equals_the_lm_eval_command_line(tiny_dir, tmp_path):
    out = tmp_path / "lm_eval.json"
    done = subprocess.run([sys.executable, "-m", "ecoflap", "--threads", "2", "evaluate", "--model", str(tiny_dir),
                           "--task", "lm_eval", "--device", "cpu", "--dtype", "float32", "--tasks", "brown_cloze",
                           "--limit", "40", "--batch-size", "8", "--num-fewshot", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads(out.read_text())["metrics"]["brown_cloze"]
    theirs = lm_eval_cli(tiny_dir, ["brown_cloze"], batch_size=8, limit=40, num_fewshot=0, seed=0)["brown_cloze"]
    assert ours["n"] == theirs["n"] == 40
    assert set(theirs) <= set(ours)  # ours adds per-item correctness and its bootstrap interval
    assert {k: ours[k] for k in theirs} == theirs  # acc, acc_norm, their stderr and n, exactly


def test_a_metric_under_several_filters_keeps_each():
    """lm-eval reports gsm8k's exact_match once per filter: each keeps its own key (the filter in
    brackets), while a metric under lm-eval's "none" filter keeps its bare name ("acc")."""
    out = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.12, "exact_match_stderr,strict-match": 0.01,
                                 "exact_match,flexible-extract": 0.31, "exact_match_stderr,flexible-extract": "N/A"},
                       "arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.02, "acc_norm,none": 0.6}},
           "n-samples": {"gsm8k": {"original": 1319, "effective": 1319}, "arc_easy": {"effective": 10}}}
    assert task_metrics(out, ["gsm8k", "arc_easy"]) == {
        "gsm8k": {"exact_match[strict-match]": 0.12, "exact_match_stderr[strict-match]": 0.01,
                  "exact_match[flexible-extract]": 0.31, "n": 1319},
        "arc_easy": {"acc": 0.5, "acc_stderr": 0.02, "acc_norm": 0.6, "n": 10}}
