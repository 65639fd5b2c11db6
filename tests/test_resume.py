"""A pruning job killed mid-way leaves nothing behind, and its rerun equals an uninterrupted
run bit for bit (same mask hash); two runs with the same seed give the same masks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import uniform_per_layer
from ecoflap.data.calibration import build_calibration, save_calibration
from ecoflap.utils.io import write_json


@pytest.fixture()
def prune_inputs(tiny_dir, tmp_path, tiny):
    from ecoflap.models.base import model_layout

    model, tok, adapter = tiny
    save_calibration(tmp_path / "calib.safetensors", build_calibration(tok, "austen-emma", 8, 32, 0), {})
    layout = model_layout(model, adapter)
    per_layer = uniform_per_layer(layout, 0.5)
    write_json(tmp_path / "alloc.json", {"target": 0.5, "layer_sparsity": per_layer})
    return tmp_path


def _cmd(tiny_dir, work, name, pruner="sparsegpt"):
    return [sys.executable, "-m", "ecoflap", "--threads", "1", "prune", "--model", str(tiny_dir),
            "--calibration", str(work / "calib.safetensors"), "--allocation", str(work / "alloc.json"),
            "--pruner", pruner, "--device", "cpu", "--batch-size", "2",
            "--out", str(work / name), "--report", str(work / f"{name}.json")]


def _hash(work, name):
    return json.loads((work / f"{name}.json").read_text())["mask_sha256"]


def test_same_seed_same_masks(tiny_dir, prune_inputs):
    for name in ("a", "b"):
        subprocess.run(_cmd(tiny_dir, prune_inputs, name), check=True, capture_output=True, timeout=300)
    assert _hash(prune_inputs, "a") == _hash(prune_inputs, "b")


@pytest.mark.parametrize("marker", ["pruning language blocks", "pruned checkpoint: writing"])
def test_killed_prune_reruns_to_the_same_result(tiny_dir, prune_inputs, marker):
    """SIGKILL right after the job announces `marker` (mid-prune, when some blocks' shards are
    written already; mid-save of the rest), then rerun."""
    work = prune_inputs
    subprocess.run(_cmd(tiny_dir, work, "ref"), check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the markers are progress bars
    proc = subprocess.Popen(_cmd(tiny_dir, work, "run"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen = b""
    deadline = time.time() + 120
    while marker.encode() not in seen and time.time() < deadline:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
    assert marker.encode() in seen, seen[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "run").exists() and not (work / "run.json").exists()  # nothing half-written
    subprocess.run(_cmd(tiny_dir, work, "run"), check=True, capture_output=True, timeout=300)
    assert _hash(work, "run") == _hash(work, "ref")
    assert sorted(p.name for p in (work / "run").iterdir()) == sorted(p.name for p in (work / "ref").iterdir())
