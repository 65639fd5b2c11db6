"""The whole Snakemake workflow on a tiny LLaMA built in code: every stage runs for real."""
import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import REPO


def tiny_config(model_dir):
    return {
        "models": {"tiny": {"source": "local", "path": str(model_dir)}},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0,
        "sparsities": [0.5], "nm_patterns": ["2:4"],
        "calibration": {"source": "austen-emma", "n_samples": 8, "seq_len": 32},
        "scorers": {
            "zo": {"kind": "zeroth_order", "granularity": "block", "eps": 1e-3, "reuse_block_inputs": True,
                   "n_samples": 4, "batch_size": 1},
            "fo": {"kind": "first_order", "granularity": "block", "n_samples": 4, "batch_size": 2},
            "owl": {"kind": "outliers", "m": 3, "n_samples": 8, "batch_size": 4},
        },
        "methods": {
            "dense": {"pruner": "none"},
            "magnitude": {"pruner": "magnitude"},
            "wanda": {"pruner": "wanda"},
            "sparsegpt": {"pruner": "sparsegpt"},
            "owl_wanda": {"pruner": "wanda", "allocation": "owl", "scorer": "owl", "lambda": 0.2},
            "ecoflap_zo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "zo"},
            "ecoflap_fo_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "fo"},
        },
        "pruning": {"n_samples": 8, "batch_size": 4},
        "evaluation": {
            "perplexity": {"dataset": "brown-heldout", "seq_len": 64, "max_windows": 4, "batch_size": 4},
            "lm_eval": {"tasks": ["brown_cloze"], "limit": 8, "batch_size": 8},
        },
    }


@pytest.fixture(scope="module")
def workflow_run(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(tiny_dir)))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                          "--configfile", str(work / "tiny.yaml"), "--cores", "2"],
                         capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-4000:]
    return work, elapsed


def test_summary_table_has_every_row(workflow_run):
    work, elapsed = workflow_run
    print(f"tiny workflow took {elapsed:.0f}s")
    table = pd.read_csv(work / "results/tiny/summary/summary.csv")
    rows = set(zip(table["method"], table["sparsity"].astype(str)))
    expected = {("dense", "0")} | {(m, "0.5") for m in ("magnitude", "wanda", "sparsegpt", "owl_wanda",
                                                        "ecoflap_zo_wanda", "ecoflap_fo_wanda")}
    expected |= {(m, "2of4") for m in ("magnitude", "wanda", "sparsegpt")}
    assert rows == expected
    pruned = table[table["method"] != "dense"]
    assert (pruned["achieved_sparsity"].sub(0.5).abs() < 2e-3).all()
    assert table["perplexity (brown-heldout)"].notna().all()
    assert table["brown_cloze acc"].between(0, 1).all()
    for col in ("prune_s", "prune_mem_mb", "perplexity_s", "lm_eval_s"):
        assert col in table
    assert table.loc[table["method"] == "ecoflap_zo_wanda", "score_s"].notna().all()
    for name in ("summary.md", "metrics.png", "profiles.png"):
        assert (work / "results/tiny/summary" / name).stat().st_size > 0


def test_ecoflap_allocation_is_non_uniform_and_exact(workflow_run):
    work, _ = workflow_run
    alloc = json.loads((work / "results/tiny/ecoflap_fo_wanda/0.5/allocation.json").read_text())
    ratios = list(alloc["unit_sparsity"].values())
    assert max(ratios) - min(ratios) > 0.01
    assert max(ratios) <= 0.6 + 1e-6
    assert alloc["planned_global_sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_results_carry_provenance_and_logs(workflow_run):
    work, _ = workflow_run
    rep = json.loads((work / "results/tiny/wanda/0.5/pruning.json").read_text())
    prov = rep["provenance"]
    assert prov["config"]["pruner"] == "wanda" and prov["config"]["seed"] == 0
    assert set(prov["input_sha256"]) == {"model", "allocation", "calibration"}
    assert "torch" in prov["versions"] and len(rep["mask_sha256"]) == 64
    assert (work / "results/tiny/wanda/0.5/logs/prune.log").read_text().count("pruned 21 layers") == 1


def test_rerun_has_nothing_to_do(workflow_run, tiny_dir):
    work, _ = workflow_run
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                          "--configfile", str(work / "tiny.yaml"), "--cores", "1", "-n"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "Nothing to be done" in out.stdout + out.stderr


def test_html_report_holds_every_table_and_plot(workflow_run, tmp_path):
    """snakemake --report: one self-contained HTML with the results table, every plot and the
    provenance, captioned and grouped by model and stage."""
    work, _ = workflow_run
    report = work / "report.html"
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                          "--configfile", str(work / "tiny.yaml"), "--report", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    html = report.read_text()
    for name in ("summary.csv", "metrics.png", "profiles.png", "environment.txt", "allocation.png"):
        assert name in html, name
    for caption in ("one row per method and sparsity", "95 % bootstrap intervals as error bars",
                    "Achieved sparsity of every block", "provenance of every result file"):
        assert caption in html, caption
    assert "This run: models tiny; target sparsities" in html  # the run's settings, in the description
    _render_in_chromium(report, tmp_path)


def _render_in_chromium(report, tmp_path):
    """Open the report in headless Chromium (Debian's package; installed here when missing and
    root) and take a screenshot of its first page; fail if the page does not render."""
    import os
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600)
        browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium) and cannot be installed here")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000",
             "--virtual-time-budget=10000"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180).stdout
    assert "ECoFLaP pruning run" in dom and "tiny" in dom, dom[:2000]  # the app rendered the description and category
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # not a blank page
    keep = os.environ.get("ECOFLAP_KEEP_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
