"""The `paper` command: every paper config plans offline (the jobs per table), and the page sets
each published number beside ours from the rows' result files, with the difference, the CLIP
table's average over its 11 models, and the figures."""
import json
import math
import subprocess
import sys

import pandas as pd
import pytest
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


def _eval(results, model, row, name, metrics, config=None):
    path = results / model / row / "eval" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": name, "metrics": metrics, "provenance": {"config": config or {}}}))


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
    assert "Table 1: BLIP-2" in page and "| flan-t5-xl | wanda | 0.5 | mmlu acc | 0.455 | 0.44 | all | -0.015 |" in page
    for fig in ("blip2_vqav2", "flant5_mmlu", "eva_vit_imagenet", "clip_average", "llama7b_wikitext2"):
        assert (tmp_path / "paper" / f"{fig}.png").stat().st_size > 5000, fig
    assert len(pd.read_csv(tmp_path / "paper/comparison.csv")) == len(df)


# A published number whose model or metric name matches nothing of ours would sit beside an empty
# cell for good, like a row that has not run yet: a misspelt name is an error instead.
PPL = "perplexity (brown-heldout)"


def _table() -> pd.DataFrame:
    return pd.DataFrame([{"method": "dense", "sparsity": "0", "target": 0.0, PPL: 20.0, f"{PPL} lo95": 19.0,
                          "prune_s": float("nan")},
                         {"method": "wanda", "sparsity": "0.6", "target": 0.6, PPL: 300.0, f"{PPL} lo95": 290.0,
                          "prune_s": 1.0}])


def test_a_number_from_part_of_a_data_set_says_so_beside_the_published_one(tmp_path, monkeypatch):
    """An evaluation run with `limit` (or perplexity with max_windows) sat beside the published
    whole-set number with nothing to tell them apart."""
    from ecoflap.reporting.paper import load_manifest, write_paper_page

    monkeypatch.chdir(REPO)
    results = tmp_path / "results"
    _eval(results, "flan-t5-xl", "wanda/0.5", "lm_eval", {"mmlu": {"acc": 0.44}}, {"limit": 50})
    _eval(results, "blip2-flant5-xl", "wanda/0.5", "vqav2", {"accuracy": 50.0}, {"limit": 100})
    df = write_paper_page(load_manifest(REPO / "config/paper.yaml"), results, tmp_path / "paper")
    ran = df[df["ours"].notna()]
    on = {(m, metric): v for m, metric, v in zip(ran["model"], ran["metric"], ran["ours on"])}
    assert on["flan-t5-xl", "mmlu acc"] == "first 50 items"
    assert on["blip2-flant5-xl", "vqav2 accuracy"] == "first 100 items"
    assert "| 0.44 | first 50 items |" in (tmp_path / "paper/index.md").read_text()
    out = _aggregate_one_row(tmp_path / "agg", {"models": {"tiny": {"rows": {"dense/0": {PPL: 21.0}}}}}, ["tiny"],
                             ppl_config={"max_windows": 4})
    assert pd.read_csv(out / "comparison.csv")["ours on"].tolist() == ["first 4 windows"]


def test_a_misspelt_model_or_metric_in_the_reference_is_an_error():
    from ecoflap.reporting.aggregate import compare_with_reference

    ref = {"models": {"tiny": {"rows": {"wanda/0.6": {PPL: 310.0}, "wanda/0.7": {PPL: 900.0}}}}}
    df = compare_with_reference(_table(), ref, "tiny")
    assert df["ours"].iloc[0] == 300.0 and math.isnan(df["ours"].iloc[1])  # 0.7 not run yet: an empty cell
    with pytest.raises(ValueError, match=r"no model 'Tiny'; it lists \['tiny'\]"):
        compare_with_reference(_table(), ref, "Tiny")
    for wrong in ("perplexity (brown_heldout)", "ppl (brown-heldout)", "prune_s", f"{PPL} lo95"):
        typo = {"models": {"tiny": {"rows": {"wanda/0.6": {wrong: 310.0}}}}}
        with pytest.raises(ValueError, match=r"use our column names: \['perplexity \(brown-heldout\)'\]"):
            compare_with_reference(_table(), typo, "tiny")


def _aggregate_one_row(tmp_path, reference: dict, config_models: list[str], ppl_config=None):
    from ecoflap.reporting.aggregate import aggregate

    results = tmp_path / "results" / "tiny"
    (results / "dense/0/eval").mkdir(parents=True)
    (results / "dense/0/eval/perplexity.json").write_text(json.dumps(
        {"metrics": {"dataset": "brown-heldout", "perplexity": 20.0, "tokens": 64},
         "provenance": {"config": ppl_config or {}}}))
    (results / "layout.json").write_text(json.dumps({"layout": {"block0": {"w": 4}}}))
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(reference))
    aggregate(results, ["dense/0"], results / "summary", tmp_path / "ref.yaml", "tiny",
              {"models": {m: {} for m in config_models}})
    return results / "summary"


def test_the_aggregate_compares_the_models_its_reference_covers(tmp_path):
    # the published numbers are another model's of the config: no comparison for this one, no error
    out = _aggregate_one_row(tmp_path / "a", {"models": {"big": {"rows": {"dense/0": {PPL: 5.0}}}}}, ["tiny", "big"])
    assert (out / "summary.csv").exists() and not (out / "comparison.csv").exists()
    out = _aggregate_one_row(tmp_path / "b", {"models": {"tiny": {"rows": {"dense/0": {PPL: 21.0}}}}}, ["tiny"])
    assert pd.read_csv(out / "comparison.csv")["ours - paper"].tolist() == [-1.0]
    # a reference model that is none of the config's is misspelt
    with pytest.raises(ValueError, match=r"lists models \['tiyn'\] that the config does not have.*\['tiny'\]"):
        _aggregate_one_row(tmp_path / "c", {"models": {"tiyn": {"rows": {"dense/0": {PPL: 21.0}}}}}, ["tiny"])


def _page_table(tmp_path, reference: dict) -> dict:
    """A manifest of one table whose config has one model evaluated on perplexity, and `reference`."""
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(reference))
    config = {"models": {"tiny": {"source": "local", "path": "x"}}, "evaluation": {"perplexity": {
        "dataset": "brown-heldout"}}, "reference": str(tmp_path / "ref.yaml")}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    return {"tables": {"t": {"config": str(tmp_path / "tiny.yaml"), "title": "T"}}}


def test_the_page_refuses_misspelt_reference_names(tmp_path):
    from ecoflap.reporting.paper import compare

    results = tmp_path / "results"
    _eval(results, "tiny", "wanda/0.5", "perplexity", {"dataset": "brown-heldout", "perplexity": 50.0, "tokens": 64})

    def page(rows: dict, model: str = "tiny") -> pd.DataFrame:
        return compare(_page_table(tmp_path, {"models": {model: {"rows": rows}}}), results)

    df = page({"wanda/0.5": {PPL: 40.0}, "wanda/0.6": {PPL: 90.0}})
    assert df["ours"].iloc[0] == 50.0 and math.isnan(df["ours"].iloc[1])  # 0.6 not run yet: an empty cell
    with pytest.raises(ValueError, match=r"lists models \['tiyn'\].*\['tiny'\]"):
        page({"wanda/0.5": {PPL: 40.0}}, model="tiyn")
    with pytest.raises(ValueError, match=r"come from no evaluation it runs; their first word must be one of "
                                         r"\['perplexity'\]"):
        page({"wanda/0.6": {"ppl (brown-heldout)": 90.0}})
    # the evaluation ran for 0.5 and gave another name: misspelt; 0.6 has not run, so it cannot tell yet
    with pytest.raises(ValueError, match=r"our results name that evaluation's metrics "
                                         r"\['perplexity \(brown-heldout\)'\]"):
        page({"wanda/0.5": {"perplexity (brown_heldout)": 40.0}})
    assert math.isnan(page({"wanda/0.6": {"perplexity (brown_heldout)": 90.0}})["ours"].iloc[0])


# the metric names our summaries give each kind of evaluation entry (ecoflap/evaluation/)
TASK_METRICS = {"vqa": ["accuracy"], "caption": ["BLEU-4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"],
                "retrieval": ["TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"], "classification": ["top1", "top5"]}


def _metric_names(config: dict, model: str) -> set[str]:
    from ecoflap.config import evaluation_task, model_evaluations

    names = set()
    for entry in model_evaluations(config, model):
        spec = config["evaluation"][entry]
        if entry == "perplexity":
            names.add(f"perplexity ({spec['dataset']})")
        elif entry == "lm_eval":
            names |= {f"{task} acc" for task in spec["tasks"]}
        else:
            names |= {f"{entry} {key}" for key in TASK_METRICS[evaluation_task(entry, spec)]}
    return names


def test_every_shipped_reference_uses_our_configs_names():
    checked = 0
    for path in sorted([*REPO.glob("config/paper/*.yaml"), *REPO.glob("config/hub/*.yaml")]):
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict) or not config.get("reference"):
            continue
        ref = yaml.safe_load((REPO / config["reference"]).read_text())
        for model, entry in ref.get("models", {}).items():
            assert model in config["models"], (path.name, model)
            for row, metrics in entry["rows"].items():
                method, label = row.split("/")
                assert method in config["methods"], (path.name, row)
                assert label == "0" if method == "dense" else float(label) in config["sparsities"], (path.name, row)
                assert set(metrics) <= _metric_names(config, model), (path.name, model, row)
                checked += len(metrics)
        averages = ref.get("averages", {})
        for model in averages.get("models", []):
            assert any(name.endswith(f" {averages['metric']}") for name in _metric_names(config, model)), model
    assert checked > 50


def test_an_evaluation_of_another_checkpoint_than_the_rows_pruning_is_an_error(tmp_path):
    """A row pruned again (new masks, sparsity and hash in pruning.json) beside evaluations of the
    previous checkpoint was summarised as one row, the new sparsity with the old metrics."""
    from ecoflap.reporting.aggregate import collect_row

    row = tmp_path / "wanda/0.5"
    (row / "eval").mkdir(parents=True)
    report = {"layer_sparsity": {"l": 0.5}, "global_sparsity": 0.5, "target": 0.5, "mask_sha256": "a" * 64,
              "checkpoint_sha256": "b" * 64}
    (row / "pruning.json").write_text(json.dumps(report))
    ppl = {"metrics": {"dataset": "brown-heldout", "perplexity": 20.0, "tokens": 64},
           "provenance": {"input_sha256": {"model": "b" * 64}}}
    (row / "eval/perplexity.json").write_text(json.dumps(ppl))
    assert collect_row(tmp_path, "wanda/0.5")[PPL] == 20.0
    ppl["provenance"]["input_sha256"]["model"] = "c" * 64
    (row / "eval/perplexity.json").write_text(json.dumps(ppl))
    with pytest.raises(ValueError, match=r"evaluated checkpoint cccccccccccc, but .*pruning.json describes "
                                         r"bbbbbbbbbbbb \(pruned again since\): rerun that evaluation"):
        collect_row(tmp_path, "wanda/0.5")
