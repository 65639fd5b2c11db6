"""GPU leases with simulated device lists (ECOFLAP_GPU_IDS) on a machine without a GPU: real
processes, real flock locks, real signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecoflap.utils import leases

HOLDER = """
import json, os, sys, time
from ecoflap.utils.leases import take_lease
lease = take_lease(int(sys.argv[1]), lock_dir=sys.argv[2])
start = time.time()
time.sleep(float(sys.argv[3]))
print(json.dumps({"devices": lease.devices, "visible": os.environ["CUDA_VISIBLE_DEVICES"],
                  "start": start, "end": time.time()}), flush=True)
"""


def _spawn(n: int, lock_dir: Path, hold_s: float, env: dict[str, str]) -> subprocess.Popen:
    full = {**os.environ, **env}
    if "CUDA_VISIBLE_DEVICES" not in env:
        full.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(n), str(lock_dir), str(hold_s)], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _overlaps(runs: list[dict]) -> list[tuple]:
    """Pairs of runs that held a common device at the same time."""
    bad = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if set(a["devices"]) & set(b["devices"]) and a["start"] < b["end"] and b["start"] < a["end"]:
                bad.append((a, b))
    return bad


def test_eight_jobs_on_four_devices_never_share_one(tmp_path):
    procs = [_spawn(1, tmp_path, 0.8, {"ECOFLAP_GPU_IDS": "0,1,2,3"}) for _ in range(8)]
    runs = _results(procs)
    assert _overlaps(runs) == []
    assert all(r["visible"] == r["devices"][0] for r in runs)  # each job sees only its own device
    assert {r["devices"][0] for r in runs} <= {"0", "1", "2", "3"}
    # eight 0.8 s jobs on four devices: at least two waves, so the locks made some wait
    assert max(r["end"] for r in runs) - min(r["start"] for r in runs) >= 1.6


def test_multi_gpu_jobs_lease_disjoint_sets(tmp_path):
    procs = [_spawn(2, tmp_path, 0.6, {"ECOFLAP_GPU_IDS": "0,1,2,3"}) for _ in range(4)]
    runs = _results(procs)
    assert all(len(set(r["devices"])) == 2 and r["visible"] == ",".join(r["devices"]) for r in runs)
    assert _overlaps(runs) == []


def test_a_killed_job_frees_its_lease(tmp_path):
    holder = _spawn(1, tmp_path, 60, {"ECOFLAP_GPU_IDS": "5"})
    lock = tmp_path / "gpu-5.lock"
    deadline = time.time() + 30
    while not (lock.exists() and lock.read_text().strip()):  # the holder wrote its pid: it holds the lock
        assert time.time() < deadline and holder.poll() is None
        time.sleep(0.1)
    with pytest.raises(TimeoutError, match="no 1 free GPU"):
        _take_here(tmp_path, "5", timeout_s=1.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lease = _take_here(tmp_path, "5", timeout_s=5.0)
    assert lease.devices == ["5"] and lease.waited_s < 2.0
    lease.release()


def _take_here(lock_dir: Path, ids: str, timeout_s: float) -> leases.Lease:
    old = {k: os.environ.get(k) for k in ("ECOFLAP_GPU_IDS", "CUDA_VISIBLE_DEVICES")}
    os.environ["ECOFLAP_GPU_IDS"] = ids
    try:
        return leases.take_lease(1, lock_dir=str(lock_dir), timeout_s=timeout_s)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_inherited_visibility_is_narrowed_never_widened(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    procs = [_spawn(1, tmp_path, 0.5, env) for _ in range(3)]
    runs = _results(procs)
    assert {d for r in runs for d in r["devices"]} <= {"2", "3"}
    assert _overlaps(runs) == []
    assert all(r["visible"] in ("2", "3") for r in runs)


def test_asking_for_more_devices_than_visible_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOFLAP_GPU_IDS", "0,1")
    with pytest.raises(RuntimeError, match="needs 3 GPU\\(s\\) but 2 are visible.*Lower the rule's gpu resource"):
        leases.take_lease(3, lock_dir=str(tmp_path))


def test_device_lists_are_read_the_same_with_or_without_spaces(monkeypatch):
    """ECOFLAP_GPU_IDS "1, 0" gave the id " 0": a lock file of its own beside "0"'s, so two jobs held device 0."""
    for variable in ("ECOFLAP_GPU_IDS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv("ECOFLAP_GPU_IDS", raising=False)
        monkeypatch.setenv(variable, " 1, 0 ,")
        assert leases.visible_devices() == (["1", "0"], variable)


def test_slurm_jobs_scope_their_locks(monkeypatch):
    monkeypatch.delenv("ECOFLAP_LEASE_DIR", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert leases.default_lock_dir().endswith("slurm-4242")


def test_cli_records_the_lease_and_refuses_cuda_without_a_gpu(tiny_dir, tmp_path):
    base = [sys.executable, "-m", "ecoflap", "evaluate", "--model", str(tiny_dir), "--task", "perplexity",
            "--seq-len", "32", "--max-windows", "2", "--gpus", "1"]
    env = {**os.environ, "ECOFLAP_GPU_IDS": "3", "ECOFLAP_LEASE_DIR": str(tmp_path / "locks")}
    # device auto on a machine without CUDA: the lease is taken and recorded, the job runs on the CPU
    run = subprocess.run(base + ["--out", str(tmp_path / "ppl.json")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "GPU lease: device(s) ['3']" in run.stderr
    where = json.loads((tmp_path / "ppl.json").read_text())["provenance"]["machine"]
    assert where["gpu_lease"]["devices"] == ["3"] and where["executor"] == "local"
    # device cuda with no GPU visible: a clear error before anything runs
    env["ECOFLAP_GPU_IDS"] = ""
    run = subprocess.run(base + ["--device", "cuda", "--out", str(tmp_path / "no.json")], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1 and "no GPU is visible" in run.stderr
    assert not (tmp_path / "no.json").exists()
