"""The Snakemake workflow on tiny vision-language models built in code: image-caption
calibration, scoring, global and per-sub-model ECoFLaP budgets, pruning, the four
evaluation tasks on fixture files in their official formats, and the comparison with a
reference table, through the same rules a user runs."""
import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

import vl_models
from conftest import REPO

FIX = REPO / "tests" / "fixtures" / "vl"


def vl_config(models: dict, reference) -> dict:
    return {
        "models": {name: {"source": "local", "path": str(path), "family": family}
                   for name, (path, family) in models.items()},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0, "sparsities": [0.5],
        "calibration": {"source": "cc3m", "pairs": str(FIX / "cc3m/pairs.tsv"), "image_root": str(FIX / "cc3m"),
                        "n_samples": 4, "prompt": "a photo of"},
        "scorers": {"fast": {"kind": "checkpointed", "granularity": "block", "reduce": "l2", "batch_size": 2}},
        "methods": {
            "dense": {"pruner": "none"},
            "wanda": {"pruner": "wanda"},
            "ecoflap_fast_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "fast"},
            "ecoflap_fast_wanda_per_tower": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "fast",
                                             "scope": "submodel"},
        },
        "pruning": {"batch_size": 2},
        "evaluation": {
            "vqav2": {"task": "vqa", "dataset": "vqav2",
                      "questions": str(FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"),
                      "annotations": str(FIX / "vqav2/v2_mscoco_val2014_annotations.json"),
                      "image_dir": str(FIX / "coco/val2014"), "max_new_tokens": 3, "batch_size": 2},
            "nocaps": {"task": "caption", "dataset": "nocaps",
                       "annotations": str(FIX / "nocaps/nocaps_val_4500_captions.json"),
                       "image_dir": str(FIX / "nocaps/images"), "max_new_tokens": 5},
            "flickr30k": {"task": "retrieval", "dataset": "flickr30k",
                          "karpathy_json": str(FIX / "karpathy/dataset_flickr30k.json"),
                          "image_dir": str(FIX / "flickr30k/flickr30k-images")},
            "imagenet": {"task": "classification", "dataset": "imagenet", "val_dir": str(FIX / "imagenet/val"),
                         "limit": 3, "templates": "simple"},
        },
        "reference": str(reference),
    }


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("vl_workflow")
    models = {"tiny-blip2": (vl_models.build("blip2_opt", work / "src_blip2"), "blip2"),
              "tiny-clip": (vl_models.build("clip", work / "src_clip"), "clip")}
    # a stand-in "published" table: the mechanics of the comparison, not paper numbers
    reference = {"source": "test reference", "models": {"tiny-clip": {"rows": {"wanda/0.5": {"flickr30k TR@1": 50.0}}}}}
    (work / "reference.yaml").write_text(yaml.safe_dump(reference))
    (work / "vl.yaml").write_text(yaml.safe_dump(vl_config(models, work / "reference.yaml")))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                          "--configfile", str(work / "vl.yaml"), "--cores", "2"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return work, time.perf_counter() - t0


def test_every_row_and_task_lands_in_the_summary(vl_run):
    work, elapsed = vl_run
    print(f"tiny vision-language workflow took {elapsed:.0f}s")
    blip2 = pd.read_csv(work / "results/tiny-blip2/summary/summary.csv")
    clip = pd.read_csv(work / "results/tiny-clip/summary/summary.csv")
    assert len(blip2) == len(clip) == 4
    for col in ("vqav2 accuracy", "nocaps CIDEr", "nocaps BLEU-4", "vqav2_s"):
        assert col in blip2 and blip2[col].notna().all(), col
    assert blip2.loc[blip2["method"] != "dense", "prune_s"].notna().all()
    for col in ("flickr30k TR@1", "flickr30k IR@10", "imagenet top1", "imagenet top5"):
        assert col in clip and clip[col].between(0, 100).all(), col
    assert "vqav2 accuracy" not in clip  # CLIP cannot answer questions: not planned
    pruned = blip2[blip2["method"] != "dense"]
    assert (pruned["achieved_sparsity"].sub(0.5).abs() < 1 / 64).all()


def test_budget_scopes_in_the_workflow(vl_run):
    work, _ = vl_run
    glob = json.loads((work / "results/tiny-blip2/ecoflap_fast_wanda/0.5/allocation.json").read_text())
    tower = json.loads((work / "results/tiny-blip2/ecoflap_fast_wanda_per_tower/0.5/allocation.json").read_text())
    assert glob["scope"] == "global" and tower["scope"] == "submodel"
    assert all(abs(v - 0.5) < 1e-6 for v in tower["planned_submodel_sparsity"].values())
    assert max(abs(v - 0.5) for v in glob["planned_submodel_sparsity"].values()) > 0.005


def test_predictions_and_comparison_are_written(vl_run):
    work, _ = vl_run
    vqa = json.loads((work / "results/tiny-blip2/wanda/0.5/eval/vqav2.json").read_text())
    assert len(vqa["predictions"]) == 4 and vqa["provenance"]["config"]["task"] == "vqa"
    caps = json.loads((work / "results/tiny-blip2/dense/0/eval/nocaps.json").read_text())["metrics"]
    assert "skipped" in caps["SPICE"] or isinstance(caps["SPICE"], float)
    comparison = pd.read_csv(work / "results/tiny-clip/summary/comparison.csv")
    row = comparison.iloc[0]
    assert (row["method"], row["metric"], row["paper"]) == ("wanda", "flickr30k TR@1", 50.0)
    assert row["ours - paper"] == pytest.approx(row["ours"] - 50.0)
