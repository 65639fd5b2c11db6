"""The lm-eval number the pipeline reports equals what lm-eval's own command line prints for the
same saved checkpoint, task, shots, limit and seed (tools/lm_eval_parity.py runs the same check
on any checkpoint, e.g. the embedded model's pruned rows)."""
from __future__ import annotations

import json
import subprocess
import sys

from ecoflap.evaluation.harness import lm_eval_cli


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
