"""The memory benchmark's rehearsal: a small LLaMA (untied head) built shard by shard, every
stage run through the CLI with offload disk and again with none, and the tool's own
comparison says both gave the same scores, masks, checkpoint files and perplexity. (The real
run, capped in a memory cgroup, needs root and a 7B-shaped model: README, "Memory benchmark".)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_memory_benchmark_rehearsal_disk_equals_none(tmp_path):
    work = tmp_path / "membench"
    out = subprocess.run([sys.executable, str(REPO / "tools" / "memory_benchmark.py"), "--work", str(work),
                          "--blocks", "2", "--small", "--no-cap", "--compare-none"],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    assert [r["exit"] for r in summary["rows"]] == [0] * 8
    assert all(v.startswith("identical") for v in summary["comparison"].values()), summary["comparison"]
    assert set(summary["comparison"]) == {"checkpointed scores", "wanda masks and checkpoint",
                                          "sparsegpt masks and checkpoint", "perplexity"}
    assert not (work / "model").exists()  # removed afterwards unless --keep
