"""What makes the workflow redo a job, and what its jobs ask a scheduler for: a config edit that
changes a result redoes exactly the jobs it concerns, one that does not redoes nothing. The jobs
run through a stand-in interpreter (`python:` in the config) that writes every output a rule
declares, so a whole run takes seconds; the dry run after an edit lists what Snakemake would redo."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

# writes what each stage's rule declares; the download's size follows its spec (trust_remote_code:
# a 4 GiB sparse safetensors file, else 1 MiB), so the jobs' memory estimates tell the two apart
FAKE = '''#!{python}
import json, sys
from pathlib import Path
args = sys.argv[3:]
if args[0] == "--threads":
    args = args[2:]
stage = args[0]
def opt(name):
    return args[args.index(name) + 1] if name in args else None
def write(path, is_dir=False):
    path = Path(path)
    if is_dir:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{{}}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(args))
if stage == "download":
    write(opt("--out"), True)
    with open(Path(opt("--out")) / "model.safetensors", "wb") as fh:
        fh.truncate(4 * 2**30 if '"trust_remote_code": true' in opt("--spec") else 2**20)
    Path(opt("--layout")).write_text(json.dumps({{"layout": {{"b0": {{"q": 1000}}, "b1": {{"q": 1000}}}}}}))
elif stage == "calibrate":
    write(opt("--out")); write(opt("--out") + ".json")
elif stage in ("score", "evaluate"):
    write(opt("--out"))
elif stage == "allocate":
    write(opt("--out")); write(opt("--plot"))
elif stage == "prune":
    write(opt("--out"), True); write(opt("--report"))
elif stage == "evaluate-text":
    for name in json.loads(opt("--spec")):
        write(Path(opt("--out-dir")) / (name + ".json"))
elif stage == "aggregate":
    for name in ("summary.csv", "summary.md", "metrics.png", "profiles.png", "environment.txt"):
        write(Path(opt("--out-dir")) / name)
else:
    sys.exit("unknown stage " + stage)
'''

CONFIG = {
    "models": {"tiny": {"source": "embedded", "name": "smollm2-135m"}},
    "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0,
    "sparsities": [0.5],
    "calibration": {"source": "austen-emma", "n_samples": 8, "seq_len": 32},
    "scorers": {"owl": {"kind": "outliers", "n_samples": 4, "batch_size": 2}},
    "methods": {
        "dense": {"pruner": "none"},
        "wanda": {"pruner": "wanda"},
        "owl_wanda": {"pruner": "wanda", "allocation": "owl", "scorer": "owl", "lambda": 0.08},
    },
    "pruning": {"n_samples": 8, "batch_size": 4},
    "evaluation": {"perplexity": {"dataset": "brown-heldout", "seq_len": 64, "max_windows": 4, "batch_size": 4}},
}


def snakemake(work: Path, config: dict, *args: str, python: str = sys.executable, targets=()):
    (work / "c.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run([python, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"), "--directory",
                           str(work), "--configfile", str(work / "c.yaml"), "--cores", "2", *args],
                          capture_output=True, text=True, timeout=300)


def planned(out) -> dict[str, int]:
    """{rule: jobs} of a dry run's job stats; {} when nothing is to be done."""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    table = text[text.index("Job stats:"):].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The small workflow run to completion through the stand-in interpreter."""
    work = tmp_path_factory.mktemp("rules")
    fake = work / "fakepy"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    (work / "fakepy-alias").symlink_to(fake)  # the same interpreter by another path
    config = {**copy.deepcopy(CONFIG), "python": str(fake)}
    out = snakemake(work, config)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert planned(snakemake(work, config, "-n")) == {}
    return work, config


def edited(done, edit) -> dict[str, int]:
    work, config = done
    config = copy.deepcopy(config)
    edit(config)
    return planned(snakemake(work, config, "-n"))


def test_an_edited_allocation_option_redoes_its_rows(done):
    """The allocation's arguments were a function of the rule's `input`, which Snakemake leaves out
    of its params trigger: a new OWL lambda (or ECoFLaP max_sparsity_offset, scope, ...) redid
    only the summary, over the old allocation and pruned model."""
    assert edited(done, lambda c: c["methods"]["owl_wanda"].update({"lambda": 0.1})) == {
        "allocate": 1, "prune": 1, "evaluate_text": 1, "aggregate": 1, "all": 1}


def test_model_keys_the_download_does_not_read_redownload_nothing(done):
    """A model's calibration override, offload or activations were part of the download's spec:
    each re-fetched the model and redid every row of it, the dense evaluation included; the same
    setting at the top level redoes only what reads it."""
    def override(c):  # (a top-level key every model overrides is a config error)
        c["calibration"].pop("seq_len")
        c["models"]["tiny"]["calibration"] = {"seq_len": 16}

    calibration = edited(done, override)
    assert "download_model" not in calibration
    assert calibration["calibration"] == 1 and calibration["evaluate_text"] == 2  # the pruned rows, not dense
    assert calibration == edited(done, lambda c: c["calibration"].update({"seq_len": 16}))
    assert "download_model" not in edited(done, lambda c: c["models"]["tiny"].update({"offload": "none"}))


def test_the_interpreters_path_redoes_no_job(done):
    """Snakemake's interpreter was written into every rule's shell (EXPLAIN_EXIT) and the jobs'
    interpreter was a tracked param: Snakemake started as .venv/bin/python3 instead of
    .venv/bin/python, or `python:` naming the same environment by another path, redid every job."""
    work, config = done
    assert edited(done, lambda c: c.update({"python": str(work / "fakepy-alias")})) == {"aggregate": 1, "all": 1}
    here = Path(sys.executable)
    others = [here.parent / name for name in ("python", "python3", f"python3.{sys.version_info.minor}")
              if name != here.name and (here.parent / name).exists()]
    if not others:
        pytest.skip(f"no second name for {here} in its folder")
    assert planned(snakemake(work, config, "-n", python=str(others[0]))) == {}


def test_a_download_redone_in_the_run_sizes_its_jobs_afresh(done, tmp_path):
    """The model's size was cached for the whole Snakemake run: after a download redone within
    the run, the prune job asked for the memory of the model it replaced (9626 MB for a 1 MiB one)."""
    work, config = done
    config = copy.deepcopy(config)
    row = "results/tiny/wanda/0.5/pruning.json"

    def prune_mem_mb(config):
        out = snakemake(work, config, "--forcerun", row, targets=(row,))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        text = out.stdout + out.stderr
        return int(re.search(r"rule prune:.*?resources:[^\n]*\bmem_mb=(\d+)", text, re.S).group(1))

    config["models"]["tiny"]["trust_remote_code"] = True  # the stand-in downloads 4 GiB
    large = prune_mem_mb(config)
    del config["models"]["tiny"]["trust_remote_code"]  # 1 MiB again, within the same run
    small = prune_mem_mb(config)
    assert large > 4 * 1024 and small < 4 * 1024, (large, small)


def test_slurm_jobs_ask_for_the_cpus_of_their_threads(tmp_path):
    """profiles/slurm set default-resources cpus_per_task: 4, which the plugin takes over a job's
    threads (and over cpus_per_gpu): the paper configs' `threads: 8` jobs got 4 CPUs."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "--profile", str(REPO / "profiles/slurm"), "--configfile",
                          str(REPO / "config/paper/llama7b_unstructured.yaml"), "--cores", "64"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = re.findall(r"threads: (\d+)\n\s+resources: ([^\n]*)", out.stdout + out.stderr)
    assert any(threads == "8" for threads, _ in jobs)
    for threads, resources in jobs:
        cpus = re.search(r"\bcpus_per_(?:task|gpu)=(\d+)", resources)
        assert cpus is None or cpus.group(1) == threads, (threads, resources)


def test_a_rerun_summary_leaves_no_previous_differences_or_comparison(done):
    """differences.* (two rows that differ) and comparison.* (a reference: covering the model) are
    written only sometimes and are no declared outputs: a summary redone without them kept the
    previous run's files beside it (differences.md still comparing methods the config had dropped)."""
    work, config = done
    summary = work / "results/tiny/summary"
    stale = [summary / name for name in ("differences.csv", "differences.md", "comparison.csv", "comparison.md")]
    for path in stale:
        path.write_text("from a previous run")
    out = snakemake(work, config, "--forcerun", "aggregate")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (summary / "summary.md").exists()
    assert [p.name for p in stale if p.exists()] == []


def test_the_local_profiles_cores_do_not_cap_cluster_jobs_silently(tmp_path):
    """profiles/default (cores: 2) is read beside --profile profiles/slurm, and over it: every SLURM
    job ran with at most 2 threads, the paper configs' `threads: 8` included, saying nothing. The
    run now stops before submitting anything, naming the fix (the one job planned here would
    only fail, were it submitted: its interpreter is /bin/false)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    config = {**copy.deepcopy(CONFIG), "threads": 4, "python": "/bin/false"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "results/tiny/layout.json", "-s", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--profile", str(REPO / "profiles/slurm"), "--configfile", str(tmp_path / "c.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "--cores 2 would run every cluster job with at most 2 threads" in text, text[-3000:]
    assert "add --workflow-profile none, or --cores 4" in text
    assert "submitted" not in text and "sbatch failed" not in text  # stopped before any submission


def test_a_local_run_says_when_cores_cap_sparsegpts_threads(tmp_path):
    """Snakemake lowers a job's threads to --cores, and SparseGPT's masks depend on the thread
    count: a local run with fewer cores than a SparseGPT method's threads says so."""
    config = {**copy.deepcopy(CONFIG), "python": "/bin/false",
              "methods": {"sparsegpt": {"pruner": "sparsegpt", "threads": 2}}}
    out = snakemake(tmp_path, config, "--cores", "1", targets=["results/tiny/layout.json"])
    assert "--cores 1 runs sparsegpt with fewer threads than the config gives them" in out.stdout + out.stderr
    out = snakemake(tmp_path, config, targets=["results/tiny/layout.json"])  # --cores 2
    assert "fewer threads than the config" not in out.stdout + out.stderr
