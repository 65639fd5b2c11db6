"""Corrupt inputs through Snakemake, end to end on the tiny LLaMA.

A tiny workflow (dense + wanda at 0.5, perplexity only) runs to completion; then

* the downloaded model's `model.safetensors` is truncated and its consumer rules are forced
  to rerun (`--forcerun prune evaluate_text`: a corrupted file inside a `directory()` output does not
  change the folder's `.snakemake_timestamp`, so Snakemake would not notice it by itself), and
* in a copy of the finished run, the calibration file's safetensors header is overwritten in
  place (which makes it newer than its consumers, so Snakemake reruns `prune` on its own).

Each rerun must fail, the failing rule's log must name the corrupt file and say what to rerun,
and no downstream output may have been rewritten or created from the corrupt input.

How Snakemake treats outputs here (snakemake/jobs.py): before a job starts it deletes that
job's existing outputs (`Job.prepare -> remove_existing_output`), and after a failure it deletes
whatever outputs the job left (`Job.cleanup`: "Removing output files of failed job"). So the
outputs of a *failing* job are gone afterwards whatever our code does -- the good pruned
checkpoint of the first run is lost. What the pipeline controls, and what is asserted, is that
the failing job wrote nothing (Snakemake finds no output to remove after the failure, and no
temporary from `atomic_path` is left), and that every job downstream of it never ran: its
outputs keep their bytes and mtimes.
"""
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

RES = Path("results/tiny")
PRUNED = RES / "wanda/0.5/model"
PRUNE_REPORT = RES / "wanda/0.5/pruning.json"
WANDA_PPL = RES / "wanda/0.5/eval/perplexity.json"
DENSE_PPL = RES / "dense/0/eval/perplexity.json"
SUMMARY = RES / "summary"


def small_config(model_dir):
    return {
        "models": {"tiny": {"source": "local", "path": str(model_dir)}},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0,
        "sparsities": [0.5], "nm_patterns": [],
        "calibration": {"source": "austen-emma", "n_samples": 4, "seq_len": 32},
        "scorers": {},
        "methods": {"dense": {"pruner": "none"}, "wanda": {"pruner": "wanda"}},
        "pruning": {"n_samples": 4, "batch_size": 4},
        "evaluation": {"perplexity": {"dataset": "brown-heldout", "seq_len": 64, "max_windows": 2, "batch_size": 2}},
    }


def snakemake(work, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                           "--configfile", str(work / "tiny.yaml"), "--cores", "2", *args],
                          capture_output=True, text=True, timeout=timeout)


def snapshot(work):
    """Every file under results/: relative path -> (sha256, mtime_ns)."""
    out = {}
    for p in sorted((work / "results").rglob("*")):
        if p.is_file():
            out[str(p.relative_to(work))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def under(files, folder):
    folder = str(folder)
    return {f: v for f, v in files.items() if f == folder or f.startswith(folder + "/")}


def assert_failed_cleanly(work, before, out, corrupt, failed_outputs, failed_logs, untouched):
    """The rerun failed; each failing rule's log names `corrupt` and says what to rerun; the
    failed jobs' outputs are gone (Snakemake removed them) and nothing else changed."""
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    for log in failed_logs:  # each consumer really ran (and failed), none was skipped
        assert f"{log} (check log file(s) for error details)" in text, text[-3000:]
    # the failed jobs left no output behind for Snakemake to clean up: they wrote nothing
    assert "Removing output files of failed job" not in text, text[-3000:]
    after = snapshot(work)
    for log in failed_logs:
        msg = (work / log).read_text()
        lines = [line for line in msg.splitlines() if line.strip()]
        # the rule's shell appends what the exit status means; the line before is the CLI's own
        assert lines[-1] == "ecoflap: the job exited with status 1: the error above says what failed and what to do."
        last = lines[-2]
        # the CLI's own error line, not an uncaught exception's traceback
        assert " ERROR ecoflap: " in last and " failed: " in last, f"{log} does not end in an error message:\n{msg[-2000:]}"
        assert str(corrupt) in last, f"{log}: last line does not name {corrupt}:\n{msg[-2000:]}"
        assert "rerun" in last, f"{log}: last line does not say what to rerun:\n{msg[-2000:]}"
    for path in failed_outputs:
        assert not (work / path).exists(), f"{path} of a failed job still exists"
        assert not under(after, path), f"{path} of a failed job still exists"
    # no temporary left by an interrupted atomic write, anywhere
    assert not [f for f in after if Path(f).name.startswith(".") and Path(f).name.endswith(".tmp")]
    changed = {f for f in after if f in before and after[f] != before[f]}
    created = set(after) - set(before)
    # only logs and benchmarks of the jobs that ran (and failed) may be new or rewritten
    allowed = {str(log) for log in failed_logs}
    assert {f for f in changed | created if f not in allowed and "/benchmarks/" not in f} == set(), \
        (sorted(changed), sorted(created))
    for path in untouched:
        assert under(after, path) == under(before, path) != {}, f"{path} was touched"


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("corrupt")
    (work / "tiny.yaml").write_text(yaml.safe_dump(small_config(tiny_dir)))
    t0 = time.perf_counter()
    out = snakemake(work)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    print(f"tiny workflow took {time.perf_counter() - t0:.1f}s")
    for p in (PRUNED / "model.safetensors.index.json", PRUNE_REPORT, WANDA_PPL, DENSE_PPL, SUMMARY / "summary.csv"):
        assert (work / p).is_file(), p
    # a pristine copy for the second scenario, mtimes and Snakemake's metadata included
    spare = tmp_path_factory.mktemp("corrupt_calibration") / "work"
    shutil.copytree(work, spare, copy_function=shutil.copy2)
    return work, spare


def test_truncated_model_weights(finished_run):
    work, _spare = finished_run
    weights = work / RES / "model/model.safetensors"
    data = weights.read_bytes()
    before = snapshot(work)
    weights.write_bytes(data[: len(data) // 2])
    before[str(weights.relative_to(work))] = snapshot(work)[str(weights.relative_to(work))]
    dry = snakemake(work, "-n")  # Snakemake itself does not see a change inside a directory() output
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout + dry.stderr
    t0 = time.perf_counter()
    out = snakemake(work, "--keep-going", "--forcerun", "prune", "evaluate_text")
    print(f"rerun on truncated weights took {time.perf_counter() - t0:.1f}s")
    assert_failed_cleanly(
        work, before, out, RES / "model/model.safetensors",
        failed_outputs=[PRUNED, PRUNE_REPORT, DENSE_PPL],
        failed_logs=[RES / "wanda/0.5/logs/prune.log", RES / "dense/0/logs/evaluate_text.log"],
        # downstream of the failed jobs: never ran
        untouched=[WANDA_PPL, SUMMARY, RES / "calibration.safetensors", RES / "wanda/0.5/allocation.json"])
    assert "download_model" in (work / RES / "wanda/0.5/logs/prune.log").read_text()  # what to rerun, by name


def test_corrupt_calibration_header(finished_run):
    _work, work = finished_run
    calib = work / RES / "calibration.safetensors"
    before = snapshot(work)
    with open(calib, "r+b") as fh:  # in place: the header's JSON starts at byte 8
        fh.seek(8)
        fh.write(b"\x00garbage\xff")
    before[str(calib.relative_to(work))] = snapshot(work)[str(calib.relative_to(work))]
    dry = snakemake(work, "-n", "--quiet", "rules")
    assert dry.returncode == 0 and "prune" in dry.stdout + dry.stderr, dry.stdout + dry.stderr
    t0 = time.perf_counter()
    out = snakemake(work, "--keep-going")
    print(f"rerun on corrupt calibration took {time.perf_counter() - t0:.1f}s")
    assert_failed_cleanly(
        work, before, out, RES / "calibration.safetensors",
        failed_outputs=[PRUNED, PRUNE_REPORT],
        failed_logs=[RES / "wanda/0.5/logs/prune.log"],
        untouched=[WANDA_PPL, DENSE_PPL, SUMMARY, RES / "model"])
