"""The `paper` command: every paper config plans offline (the jobs per table), and the page sets
each published number beside ours from the rows' result files, with the difference, the CLIP
table's average over its 11 models, and the figures."""
import json
import math
import subprocess
import sys

import pandas as pd
import yaml

from conftest import REPO


def test_every_paper_config_plans(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ecoflap", "paper", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    for name in manifest["tables"]:
        jobs = int(lines[name].split()[1])
        assert jobs > 5 and "prune" in lines[name], lines[name]
    assert int(lines["all"].split()[2]) == sum(int(lines[n].split()[1]) for n in manifest["tables"])
    # the CLIP table: one pruned CLIP per data set and method, as the authors calibrate per data set
    assert "prune 44" in lines["clip_table"] and "calibration 11" in lines["clip_table"]


def _eval(results, model, row, name, metrics):
    path = results / model / row / "eval" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": name, "metrics": metrics}))


def test_the_page_sets_ours_beside_the_published_numbers(tmp_path, monkeypatch):
    from ecoflap.reporting.paper import load_manifest, write_paper_page

    monkeypatch.chdir(REPO)  # the manifest's config paths are relative to the repository
    results = tmp_path / "results"
    _eval(results, "flan-t5-xl", "wanda/0.5", "lm_eval", {"mmlu": {"acc": 0.44}})
    clip = yaml.safe_load((REPO / "config/paper/published/clip_table.yaml").read_text())["averages"]
    for i, model in enumerate(clip["models"]):
        _eval(results, model, "dense/0", model.removeprefix("clip-b16-"), {"top1": 60.0 + i, "top5": 90.0})
    _eval(results, clip["models"][0], "wanda/0.4", "caltech101", {"top1": 40.0})  # 1 of 11: no average yet
    df = write_paper_page(load_manifest(REPO / "config/paper.yaml"), results, tmp_path / "paper")
    mmlu = df[(df["model"] == "flan-t5-xl") & (df["method"] == "wanda") & (df["sparsity"] == "0.5")].iloc[0]
    assert mmlu["ours"] == 0.44 and math.isclose(mmlu["ours - paper"], 0.44 - 0.455)
    avg = df[(df["table"] == "clip_table") & (df["method"] == "dense")].iloc[0]
    assert avg["model"] == "average" and math.isclose(avg["ours"], 65.0) and avg["paper"] == 65.3
    assert math.isnan(df[(df["table"] == "clip_table") & (df["method"] == "wanda")]["ours"].iloc[0])
    # BLIP-2's 50 % row and 60 % row come from two configs and share one model
    assert {"0.5", "0.6"} <= set(df[(df["model"] == "blip2-flant5-xl") & (df["metric"] == "vqav2 accuracy")]["sparsity"])
    page = (tmp_path / "paper/index.md").read_text()
    assert "Table 1: BLIP-2" in page and "| flan-t5-xl | wanda | 0.5 | mmlu acc | 0.455 | 0.44 | -0.015 |" in page
    for fig in ("blip2_vqav2", "flant5_mmlu", "eva_vit_imagenet", "clip_average", "llama7b_wikitext2"):
        assert (tmp_path / "paper" / f"{fig}.png").stat().st_size > 5000, fig
    assert len(pd.read_csv(tmp_path / "paper/comparison.csv")) == len(df)
