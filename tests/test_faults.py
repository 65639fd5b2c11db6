"""Nothing silently wrong: the probes of issue 17, each ending in a clear error that names the
file and the fix before any number is written."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from conftest import REPO


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ecoflap", "--threads", "1", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory):
    """A checkpoint written by our download rule (every file recorded), plus its layout and a
    calibration file and a uniform allocation for it."""
    work = tmp_path_factory.mktemp("faults")
    out = _cli("download", "--spec", json.dumps({"source": "local", "path": str(tiny_dir)}), "--out", work / "model",
               "--layout", work / "layout.json")
    assert out.returncode == 0, out.stderr[-2000:]
    out = _cli("calibrate", "--model", work / "model", "--n-samples", 4, "--seq-len", 16, "--out",
               work / "calib.safetensors")
    assert out.returncode == 0, out.stderr[-2000:]
    out = _cli("allocate", "--layout", work / "layout.json", "--kind", "uniform", "--target", 0.5, "--out",
               work / "alloc.json")
    assert out.returncode == 0, out.stderr[-2000:]
    return work


def _edited_copy(src, dst, layers):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_checkpoint_whose_config_was_edited_is_refused(ckpt, tmp_path):
    """Probe 1: config.json is now part of the checksum record, so the edit is caught on load,
    and the message names the file and what to rerun; no result file is written."""
    model = _edited_copy(ckpt / "model", tmp_path / "model", 2)
    out = _cli("evaluate", "--model", model, "--task", "perplexity", "--device", "cpu", "--dtype", "float32",
               "--seq-len", 16, "--max-windows", 2, "--out", tmp_path / "ppl.json")
    assert out.returncode == 1
    assert f"{model / 'config.json'} differs from when it was written" in out.stderr
    assert "rerun" in out.stderr
    assert not (tmp_path / "ppl.json").exists()


@pytest.mark.parametrize("layers, kind", [(2, "unexpected keys"), (4, "missing keys")])
def test_strict_loading_without_a_checksum_record(ckpt, tmp_path, layers, kind):
    """A folder we did not write (no record) with a config that disagrees with its weights:
    strict loading names the keys instead of loading random or dropped weights."""
    model = _edited_copy(ckpt / "model", tmp_path / "model", layers)
    (model / "ecoflap_checksums.json").unlink()
    out = _cli("evaluate", "--model", model, "--task", "perplexity", "--device", "cpu", "--dtype", "float32",
               "--seq-len", 16, "--max-windows", 2, "--out", tmp_path / "ppl.json")
    assert out.returncode == 1
    assert "config.json and the weights disagree" in out.stderr and kind in out.stderr
    assert "model.layers." in out.stderr  # the keys are named
    assert not (tmp_path / "ppl.json").exists()


def test_a_file_added_to_a_checkpoint_is_refused(ckpt, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ckpt / "model", model)
    (model / "tokenizer_extra.json").write_text("{}")
    out = _cli("evaluate", "--model", model, "--task", "perplexity", "--device", "cpu", "--dtype", "float32",
               "--seq-len", 16, "--max-windows", 2, "--out", tmp_path / "ppl.json")
    assert out.returncode == 1 and "tokenizer_extra.json" in out.stderr


@pytest.mark.parametrize("bad", [1.5, float("nan"), -0.1, "0.5"])
def test_an_allocation_with_a_bad_ratio_names_file_layer_value_and_rule(ckpt, tmp_path, bad):
    """Probe 2: a ratio of 1.5 or NaN for one layer."""
    alloc = json.loads((ckpt / "alloc.json").read_text())
    layer = sorted(alloc["layer_sparsity"])[3]
    alloc["layer_sparsity"][layer] = bad
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps(alloc))  # json writes NaN as NaN, as a buggy writer would
    out = _cli("prune", "--model", ckpt / "model", "--calibration", ckpt / "calib.safetensors", "--allocation", path,
               "--pruner", "wanda", "--device", "cpu", "--dtype", "float32", "--n-samples", 4, "--batch-size", 2,
               "--out", tmp_path / "pruned", "--report", tmp_path / "pruning.json")
    assert out.returncode == 1
    shown = "nan" if isinstance(bad, float) and math.isnan(bad) else repr(bad)
    assert str(path) in out.stderr and f"layer_sparsity[{layer!r}] = {shown}" in out.stderr
    assert "rerun the allocate rule" in out.stderr
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "pruning.json").exists()


def test_an_allocation_for_another_model_is_refused(ckpt, tmp_path):
    alloc = json.loads((ckpt / "alloc.json").read_text())
    alloc["layer_sparsity"]["model.layers.9.mlp.up_proj"] = 0.5
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps(alloc))
    out = _cli("prune", "--model", ckpt / "model", "--allocation", path, "--pruner", "magnitude", "--device", "cpu",
               "--dtype", "float32", "--out", tmp_path / "pruned", "--report", tmp_path / "pruning.json")
    assert out.returncode == 1 and "model.layers.9.mlp.up_proj" in out.stderr and "another model" in out.stderr


def test_scores_that_are_negative_or_for_another_model_are_refused(ckpt, tmp_path):
    layout = json.loads((ckpt / "layout.json").read_text())["layout"]
    scores = {"kind": "checkpointed", "granularity": "block", "scores": {b: 1.0 for b in layout}}
    first = next(iter(layout))
    for name, bad in (("negative", {**scores["scores"], first: -2.0}), ("foreign", {"model.layers.7": 1.0})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**scores, "scores": bad}))
        out = _cli("allocate", "--layout", ckpt / "layout.json", "--kind", "ecoflap", "--scores", path, "--target", 0.5,
                   "--out", tmp_path / "alloc.json")
        assert out.returncode == 1 and str(path) in out.stderr and "rerun the score rule" in out.stderr, name
        assert not (tmp_path / "alloc.json").exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A 96 kB file system (tmpfs; the machines run as root): a real full disk, not a mock."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"mounting a tmpfs needs root: {done.stderr}"
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_saving_names_the_path_and_the_space(ckpt, small_disk):
    """Probe 3: the pruned tiny checkpoint (164 kB of weights) does not fit in 96 kB:
    a message with the path, the space needed and free; nothing half-written."""
    out_dir = small_disk / "pruned"
    out = _cli("prune", "--model", ckpt / "model", "--allocation", ckpt / "alloc.json", "--pruner", "magnitude",
               "--device", "cpu", "--dtype", "float32", "--out", out_dir, "--report", small_disk / "pruning.json")
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"no space left writing {out_dir}" in out.stderr
    assert "kB are free" in out.stderr and "it needs about 156.9 kB" in out.stderr  # the tiny weights
    assert "Traceback" not in out.stderr.split("prune failed")[-1]
    assert list(small_disk.iterdir()) == []  # no temporary, no final name, no report


def test_a_read_only_destination_is_named(tmp_path):
    from ecoflap.utils.io import StorageError, write_json

    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        with pytest.raises(StorageError, match="read-only"):
            write_json(ro / "x.json", {"a": 1})
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("signal_name, status, cause", [("KILL", 137, "out-of-memory"), ("TERM", 143, "time limit")])
def test_a_killed_job_says_so_in_its_log(tmp_path, signal_name, status, cause):
    """The suffix every model-running rule's shell carries (common.smk EXPLAIN_EXIT), on a job
    killed from outside: the log ends with the signal and its likely cause; the status stays."""
    log = tmp_path / "job.log"
    cmd = (f"{sys.executable} -c 'import os, signal; print(\"working\", flush=True); "
           f"os.kill(os.getpid(), signal.SIG{signal_name})' > {log} 2>&1 "
           f"|| {{ rc=$?; {sys.executable} -m ecoflap.utils.exits $rc >> {log}; exit $rc; }}")
    done = subprocess.run(["bash", "-c", cmd], cwd=REPO)
    assert done.returncode == status
    text = log.read_text()
    assert text.startswith("working") and f"status {status}" in text and cause in text


def test_every_model_running_rule_explains_its_exit():
    for rule in ("download", "calibration", "scoring", "pruning", "evaluation", "allocation", "report"):
        text = (REPO / "workflow" / "rules" / f"{rule}.smk").read_text()
        assert text.count("2>&1") == text.count("{EXPLAIN_EXIT}"), rule


def test_a_job_killed_by_its_memory_cgroup_says_so(tmp_path):
    """A job over its memory limit (a cgroup v1 memory group, as the machines have and as SLURM
    and the memory benchmark use): the kernel kills it, and the log says out-of-memory."""
    group = f"/sys/fs/cgroup/memory/ecoflap-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(group)
    try:
        with open(f"{group}/memory.limit_in_bytes", "w") as fh:
            fh.write(str(64 * 2**20))
        log = tmp_path / "job.log"
        job = (f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -c "
               f"'import sys; print(\"allocating\", flush=True); x = bytearray(512 * 2**20); x[::4096] = "
               f"b\"1\" * len(x[::4096])'")
        cmd = f"bash -c '{job.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}' > {log} 2>&1 " \
              f"|| {{ rc=$?; {sys.executable} -m ecoflap.utils.exits $rc >> {log}; exit $rc; }}"
        done = subprocess.run(["bash", "-c", cmd], cwd=REPO)
        assert done.returncode == 137
        assert "out-of-memory" in log.read_text()
        with open(f"{group}/memory.failcnt") as fh:
            assert int(fh.read()) > 0  # the limit was hit: the kill came from the cgroup
    finally:
        os.rmdir(group)


def test_two_workflows_on_one_results_folder(tmp_path):
    """Snakemake's lock: a second run on the same folder while one is running is refused and
    names the lock; the first is not disturbed."""
    import time

    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "models": {"m": {"source": "embedded", "name": "smollm2-135m"}}, "sparsities": [0.5],
        "calibration": {"source": "austen-emma", "n_samples": 4}, "methods": {"dense": {"pruner": "none"}},
        "evaluation": {"perplexity": {"dataset": "brown-heldout"}}}))
    base = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "c.yaml"), "--cores", "1"]
    (tmp_path / ".snakemake" / "locks").mkdir(parents=True)
    # a real run holds the lock while it works (the embedded model's download takes seconds)
    runner = subprocess.Popen(base + ["--until", "download_model"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        for _ in range(200):
            if any((tmp_path / ".snakemake" / "locks").iterdir()):
                break
            time.sleep(0.1)
        second = subprocess.run(base + ["--until", "download_model"], capture_output=True, text=True, timeout=120)
        assert runner.poll() is None  # the first run was still working when the second was refused
        assert second.returncode != 0
        assert "LockException" in second.stderr + second.stdout or "cannot be locked" in second.stderr + second.stdout
    finally:
        runner.kill()
        runner.wait()
