"""The workflow through profiles/slurm on a real SLURM: a one-node cluster started on this
machine (workflow/scripts/slurm_local.sh, SLURM 22.05 from Debian, no accounting), the
official executor plugin submitting every job with sbatch. Needs root (it runs slurmctld and
slurmd); CI runs as root. Proves the jobs went through SLURM from each result's provenance
(executor, host, SLURM job id), then injects a failing job, and cancels a running one with
scancel and reruns."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SCRIPT = REPO / "workflow/scripts/slurm_local.sh"
# the profile sends the stages without a GPU to a "cpu" partition; this cluster has one, "debug"
DEBUG_PARTITION = [f"{rule}:slurm_partition=debug" for rule in ("download_model", "calibration", "allocate", "aggregate")]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None and shutil.which("slurmctld") is None,
    reason="needs root and Debian's slurm-wlm (or apt-get to install it) to run a one-node SLURM",
)


@pytest.fixture(scope="module")
def slurm():
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    yield started.stdout.strip()
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def slurm_config(model_dir: Path) -> dict:
    return {
        "models": {"tiny": {"source": "local", "path": str(model_dir)}},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0, "offload": "none",
        "sparsities": [0.5],
        "calibration": {"source": "austen-emma", "n_samples": 8, "seq_len": 32},
        "scorers": {"fo": {"kind": "first_order", "granularity": "block", "n_samples": 4, "batch_size": 2}},
        "methods": {
            "dense": {"pruner": "none"},
            "wanda": {"pruner": "wanda"},
            "ecoflap_fo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "fo"},
        },
        "pruning": {"n_samples": 8, "batch_size": 4},
        "evaluation": {"perplexity": {"dataset": "brown-heldout", "seq_len": 64, "max_windows": 4, "batch_size": 4}},
        "resources": {"mem_mb": 1500, "runtime": 10},
    }


def snakemake_slurm(work: Path, *extra: str, wait: bool = True, env: dict | None = None,
                    set_resources: tuple[str, ...] = ()):
    """The profile as users run it, with this one-node cluster's partition and sizes
    (`set_resources` joins the partition overrides: a second --set-resources would replace them)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--profile", str(REPO / "profiles/slurm"), "--configfile", str(work / "tiny.yaml"),
           "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=10", "cpus_per_task=1",
           "--set-resources", *DEBUG_PARTITION, *set_resources,
           "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5", "--jobs", "4", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def result_files(work: Path) -> list[Path]:
    """Every JSON a model-running job wrote with provenance (scores, pruning reports, metrics)."""
    out = []
    for path in sorted((work / "results/tiny").rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and "machine" in data.get("provenance", {}):
            out.append(path)
    return out


@pytest.fixture(scope="module")
def slurm_run(slurm, tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm")
    (work / "tiny.yaml").write_text(yaml.safe_dump(slurm_config(tiny_dir)))
    t0 = time.perf_counter()
    run = snakemake_slurm(work)
    elapsed = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-5000:]
    return work, run, elapsed


def test_every_job_ran_as_a_slurm_job(slurm_run):
    work, run, elapsed = slurm_run
    files = result_files(work)
    assert len(files) >= 6  # scores, 2 pruning reports, 3 perplexities, the layout...
    ids = {}
    for path in files:
        where = json.loads(path.read_text())["provenance"]["machine"]
        assert where["executor"] == "slurm", path
        assert where["slurm_job_id"].isdigit() and where["host"], path
        ids[str(path.relative_to(work))] = where["slurm_job_id"]
    # one job per output: no two results came from the same SLURM job
    assert len(set(ids.values())) == len(ids), ids
    logs = {p.stem for p in (work / "logs/slurm").rglob("*.log")}
    assert set(ids.values()) <= logs, (ids, logs)
    summary = work / "results/tiny/summary/summary.csv"
    assert summary.exists()
    print(f"SLURM run: {len(ids)} result files, SLURM job ids {sorted(ids.values(), key=int)}, {elapsed:.0f} s")


def test_a_failing_job_is_reported_with_its_slurm_log(slurm_run):
    work, _run, _elapsed = slurm_run
    cfg = yaml.safe_load((work / "tiny.yaml").read_text())
    cfg["evaluation"]["perplexity"]["seq_len"] = 10_000_000  # longer than the text: the job must fail
    bad = work / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    run = _run_with_config(work, bad)
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "SLURM-job" in text and "failed" in text, text[-3000:]
    assert str(work / "logs/slurm") in text or "logs/slurm" in text, text[-3000:]
    # the rule's own log ends with the CLI's error, naming the fix
    log = next((work / "results/tiny/dense/0/logs").glob("evaluate_text.log")).read_text()
    assert "fewer than one window" in log


def scores_to_redo(slurm_run, tmp_path: Path) -> Path:
    """A copy of the SLURM run's folder (results and Snakemake's records, times kept) without
    its scores: only the scoring job is left to run, not the download and calibration before
    it, which would cost each test two more SLURM jobs and their status polls."""
    work = tmp_path / "work"
    shutil.copytree(slurm_run[0], work, symlinks=True,
                    ignore=lambda folder, names: ["locks"] if Path(folder).name == ".snakemake" else [])
    (work / "results/tiny/scores/fo.json").unlink()
    return work


def _run_with_config(work: Path, configfile: Path):
    original = (work / "tiny.yaml").read_text()
    (work / "tiny.yaml").write_text(configfile.read_text())
    try:  # only the dense evaluation: the one failing job is the point, not a full rerun
        return snakemake_slurm(work, "results/tiny/dense/0/eval/perplexity.json")
    finally:
        (work / "tiny.yaml").write_text(original)


def test_a_cancelled_job_fails_the_run_and_a_rerun_completes(slurm_run, tmp_path):
    """scancel on a running job: Snakemake reports it failed, nothing half-written stays, and
    running the workflow again finishes. (With the profile's `retries: 1` the cancelled job
    is resubmitted instead and the first run completes; --retries 0 shows the failure.)"""
    work = scores_to_redo(slurm_run, tmp_path)
    target = "results/tiny/scores/fo.json"  # the scoring job, the one to cancel
    proc = snakemake_slurm(work, target, "--retries", "0", wait=False)
    cancelled = None
    deadline = time.time() + 300
    while cancelled is None and time.time() < deadline and proc.poll() is None:
        out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %j"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            job_id, _name = line.split(maxsplit=1)
            subprocess.run(["scancel", job_id], check=True)
            cancelled = job_id
            break
        time.sleep(0.5)
    assert cancelled, "no SLURM job was seen running"
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, output[-3000:]
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in output, output[-3000:]
    rerun = snakemake_slurm(work, target, "--retries", "0")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert json.loads((work / target).read_text())["provenance"]["machine"]["executor"] == "slurm"


def test_a_job_over_its_time_limit_is_reported_and_a_rerun_completes(slurm_run, tiny_dir, tmp_path):
    """A real pipeline job outlives its one-minute SLURM limit: its GPU lease (a simulated
    device) is held by this test, so the job waits for it; SLURM ends it at the limit,
    Snakemake reports the timeout, and once the device is free a rerun completes."""
    from ecoflap.utils.leases import take_lease

    work = scores_to_redo(slurm_run, tmp_path)
    cfg = slurm_config(tiny_dir)
    cfg["resources"] = {"gpu": 1, "runtime": 1}  # the CLI leases one GPU; SLURM gives the job 1 minute
    cfg["device"] = "auto"  # (device: cpu takes no lease; auto with a simulated GPU does, then runs on the CPU)
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    locks = tmp_path / "locks"
    env = {**os.environ, "ECOFLAP_GPU_IDS": "0", "ECOFLAP_LEASE_DIR": str(locks)}
    os.environ.update(ECOFLAP_GPU_IDS="0")
    try:
        held = take_lease(1, lock_dir=str(locks), what="the test, holding the only device")
    finally:
        os.environ.pop("ECOFLAP_GPU_IDS", None)
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    # the node has no GPUs: SLURM is asked for none (gpu=0), while the CLI still takes a lease
    no_gpu = [f"{rule}:gpu=0" for rule in ("score", "prune", "evaluate_text")]
    target = "results/tiny/scores/fo.json"  # one job that leases a GPU (and the two before it)
    run = snakemake_slurm(work, target, "--retries", "0", env=env, set_resources=no_gpu)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    assert "SLURM status is: 'TIMEOUT'" in out, out[-3000:]
    held.release()
    rerun = snakemake_slurm(work, target, "--retries", "0", env=env, set_resources=no_gpu)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((work / target).read_text())["provenance"]["machine"]["gpu_lease"]["devices"] == ["0"]

