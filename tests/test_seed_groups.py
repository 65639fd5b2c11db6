"""Seed groups through the workflow: two entries of one tiny model that differ only in seed,
with the newer baselines (ATP's search, DSnoT) beside ECoFLaP; the group's summary holds the
mean and spread over the seeds, the coarse stages' costs and ECoFLaP's verdicts."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO


def group_config(model_dir):
    model = {"source": "local", "path": str(model_dir)}
    return {
        "models": {"tiny-s0": {**model, "seed": 0}, "tiny-s1": {**model, "seed": 1}},
        "seed_groups": {"tiny": ["tiny-s0", "tiny-s1"]},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0,
        "sparsities": [0.5],  # one: the group's arithmetic over sparsities is tested on hand-built tables below
        "calibration": {"source": "austen-emma", "n_samples": 8, "seq_len": 32},
        "scorers": {
            "fast": {"kind": "checkpointed", "granularity": "block", "reduce": "l2", "n_samples": 4, "batch_size": 2},
            "atp": {"kind": "atp_search", "step": 0.1, "n_samples": 4, "batch_size": 4},
        },
        "methods": {
            "dense": {"pruner": "none"},
            "wanda": {"pruner": "wanda"},
            "wanda_dsnot": {"pruner": "wanda", "refine": "dsnot", "skip_layers": []},
            "atp_wanda": {"pruner": "wanda", "allocation": "atp", "scorer": "atp"},
            "ecoflap_fast_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "fast"},
        },
        "pruning": {"n_samples": 8, "batch_size": 4, "keep_checkpoints": False},
        "evaluation": {"perplexity": {"dataset": "brown-heldout", "seq_len": 64, "max_windows": 4, "batch_size": 4}},
    }


@pytest.fixture(scope="module")
def group_run(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("seed_group")
    (work / "group.yaml").write_text(yaml.safe_dump(group_config(tiny_dir)))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
                          "--configfile", str(work / "group.yaml"), "--cores", "2"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return work


def test_the_seeds_share_the_model_and_differ_in_calibration(group_run):
    results = group_run / "results"
    calib = [json.loads((results / m / "calibration.json").read_text()) for m in ("tiny-s0", "tiny-s1")] \
        if (results / "tiny-s0" / "calibration.json").exists() else None
    s0, s1 = ((results / m / "calibration.safetensors").read_bytes() for m in ("tiny-s0", "tiny-s1"))
    assert s0 != s1
    assert calib is None or calib[0] != calib[1]
    w0, w1 = (json.loads((results / m / "wanda/0.5/pruning.json").read_text()) for m in ("tiny-s0", "tiny-s1"))
    assert w0["provenance"]["config"].get("seed", 0) != w1["provenance"]["config"].get("seed", 0) or \
        w0["mask_sha256"] != w1["mask_sha256"]


def test_group_summary_has_mean_and_spread(group_run):
    out = group_run / "results/seed_groups/tiny"
    table = pd.read_csv(out / "summary.csv", dtype={"sparsity": str})
    assert set(zip(table["method"], table["sparsity"].astype(str))) == \
        {("dense", "0")} | {(m, s) for m in ("wanda", "wanda_dsnot", "atp_wanda", "ecoflap_fast_wanda")
                            for s in ("0.5",)}
    assert (table["seeds"] == 2).all()
    ppl = "perplexity (brown-heldout)"
    members = [pd.read_csv(group_run / f"results/tiny-s{i}/summary/summary.csv", dtype={"sparsity": str}).set_index(["method", "sparsity"])
               for i in (0, 1)]
    for _, row in table[table["method"] != "dense"].iterrows():
        values = [m.loc[(row["method"], row["sparsity"]), ppl] for m in members]
        assert row[ppl] == pytest.approx(sum(values) / 2)
        assert row[f"{ppl} min"] == pytest.approx(min(values)) and row[f"{ppl} max"] == pytest.approx(max(values))
    dense = table[table["method"] == "dense"]
    assert (dense[f"{ppl} sd"] == 0).all()  # the same model and evaluation text: no spread
    costs = pd.read_csv(out / "costs.csv").set_index("scorer")
    assert set(costs.index) == {"fast", "atp"} and (costs["x_wanda_job"] > 0).all()
    # the computation alone is part of its job (which adds start-up and loading)
    assert (costs["x_wanda_compute"] > 0).all() and (costs["compute_s"] < costs["job_s"]).all()
    assert costs.loc["atp", "search_runs"] == 4  # steps 0.1 ... 0.4: the slopes below 50 %'s largest legal one
    verdicts = pd.read_csv(out / "verdicts_perplexity_brown-heldout.csv")
    assert set(verdicts["versus"]) == {"wanda", "atp_wanda"}  # same pruner, no refiner
    assert set(verdicts["verdict"]) <= {"win", "tie", "loss"}
    for name in ("summary.md", "metrics.png", "profiles.png"):
        assert (out / name).stat().st_size > 0


def test_dsnot_rows_keep_the_sparsity_and_change_the_masks(group_run):
    for model in ("tiny-s0", "tiny-s1"):
        plain, refined = (json.loads((group_run / f"results/{model}/{m}/0.5/pruning.json").read_text())
                          for m in ("wanda", "wanda_dsnot"))
        assert refined["layer_sparsity"] == plain["layer_sparsity"]
        assert refined["mask_sha256"] != plain["mask_sha256"] and refined["refine"] == "dsnot"


def test_temporary_checkpoints_are_evaluated_before_more_are_pruned(group_run):
    """keep_checkpoints: false. Evaluations outrank pruning, so each checkpoint is evaluated and
    deleted as soon as it is written: never more unevaluated checkpoints on disk than cores (2),
    where pruning first would pile up all 8 before the first evaluation."""
    (log,) = (group_run / ".snakemake/log").glob("*.snakemake.log")
    rule, on_disk, most, pruned = None, set(), 0, 0
    outputs = {}
    for line in log.read_text().splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.startswith("    output:") and rule == "prune":
            job_outputs = line.split(":", 1)[1]
        elif line.startswith("    jobid:") and rule == "prune":
            outputs[line.split(":")[1].strip()] = job_outputs.split(",")[0].strip()
        elif line.startswith("Finished jobid:") and "(Rule: prune)" in line:
            on_disk.add(outputs[line.split()[2]])
            pruned += 1
            most = max(most, len(on_disk))
        elif line.startswith("Removing temporary output"):
            on_disk.discard(line.split("output", 1)[1].strip().rstrip("."))
    assert pruned == 8 and not on_disk
    assert most <= 2


# Hand-built members' summary tables (no workflow): what the seed group makes of a seed whose
# value is missing, of a metric only some members have, and of two methods that share an allocation.
PPL = "perplexity (brown-heldout)"
SMALL_METHODS = {"dense": {"pruner": "none"}, "wanda": {"pruner": "wanda"},
                 "ecoflap_fast_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "fast"}}


def _member(values: dict[tuple[str, str], float]) -> pd.DataFrame:
    """One member's summary: a row per (method, sparsity) with its perplexity."""
    return pd.DataFrame([{"method": m, "sparsity": s, "target": float(s), "achieved_sparsity": float(s), PPL: v,
                          f"{PPL} lo95": v - 1, f"{PPL} hi95": v + 1, "prune_s": 1.0}
                         for (m, s), v in values.items()])


def _members() -> dict[str, pd.DataFrame]:
    """Three seeds; seed 2 has no perplexity for wanda at 0.7 (a skipped evaluation)."""
    base = {("dense", "0"): 20.0, ("wanda", "0.5"): 40.0, ("wanda", "0.7"): 200.0,
            ("ecoflap_fast_wanda", "0.5"): 30.0, ("ecoflap_fast_wanda", "0.7"): 150.0}
    members = {f"tiny-s{k}": _member({key: v + k for key, v in base.items()}) for k in range(3)}
    members["tiny-s2"].loc[(members["tiny-s2"]["method"] == "wanda") & (members["tiny-s2"]["sparsity"] == "0.7"),
                           PPL] = float("nan")
    return members


def _write_members(results, members: dict[str, pd.DataFrame]) -> None:
    for name, table in members.items():
        (results / name / "summary").mkdir(parents=True)
        table.to_csv(results / name / "summary" / "summary.csv", index=False)
        (results / name / "layout.json").write_text(json.dumps({"layout": {"block0": {"w": 4}}}))


def test_spread_counts_each_metrics_values_over_the_seeds():
    from ecoflap.reporting.seed_groups import spread

    table = spread(_members()).set_index(["method", "sparsity"])
    row = table.loc[("wanda", "0.7")]
    assert row["seeds"] == 3 and row[f"{PPL} seeds"] == 2  # the row exists for 3 seeds, its value for 2
    assert row[PPL] == pytest.approx((200.0 + 201.0) / 2)
    assert (table.drop(index=[("wanda", "0.7")])[f"{PPL} seeds"] == 3).all()


def test_summary_says_over_how_many_seeds_and_shows_every_members_metrics(tmp_path):
    from ecoflap.reporting.seed_groups import seed_group_summary

    members = _members()
    for name in ("tiny-s1", "tiny-s2"):  # a metric the first member lacks is still summarised
        members[name]["cloze acc"] = 0.5
    _write_members(tmp_path / "results", members)
    config = {"methods": SMALL_METHODS, "models": {m: {"seed": k} for k, m in enumerate(members)}}
    seed_group_summary(tmp_path / "results", "tiny", list(members), config, tmp_path / "out")
    saved = pd.read_csv(tmp_path / "out/summary.csv", dtype={"sparsity": str}).set_index(["method", "sparsity"])
    assert saved.loc[("wanda", "0.7"), f"{PPL} seeds"] == 2 and saved.loc[("wanda", "0.5"), "cloze acc seeds"] == 2
    md = (tmp_path / "out/summary.md").read_text()
    wanda_07 = next(line for line in md.splitlines() if line.startswith("| wanda | 0.7 |"))
    assert "200.5 ± 0.71 [200, 201] (2 of 3 seeds)" in wanda_07  # the every-row table
    assert "200.5 ± 0.71 (2 of 3 seeds)" in md  # at a glance
    assert "## cloze acc at a glance" in md and "0.5 ± 0 (2 of 3 seeds)" in md


def test_a_verdict_without_values_is_na_and_not_counted(tmp_path):
    from ecoflap.reporting.seed_groups import seed_group_summary, spread, verdicts

    members = _members()
    for table in members.values():  # no seed has ECoFLaP's perplexity at 0.5
        table.loc[(table["method"] == "ecoflap_fast_wanda") & (table["sparsity"] == "0.5"), PPL] = float("nan")
    v = verdicts(spread(members), SMALL_METHODS, PPL).set_index("sparsity")
    assert v.loc["0.5", "verdict"] == "n/a" and v.loc["0.7", "verdict"] == "win"
    _write_members(tmp_path / "results", members)
    config = {"methods": SMALL_METHODS, "models": {m: {"seed": k} for k, m in enumerate(members)}}
    seed_group_summary(tmp_path / "results", "tiny", list(members), config, tmp_path / "out")
    counts = (tmp_path / "out/summary.md").read_text().split("Counts:")[1]
    assert "| method | win |" in counts and "| ecoflap_fast_wanda | 1 |" in counts  # n/a neither column nor tie


def test_methods_that_share_an_allocation_get_a_row_and_a_line_each():
    from ecoflap.reporting.seed_groups import allocation_labels, at_a_glance

    methods = {"owl_wanda": {"pruner": "wanda", "allocation": "owl", "scorer": "owl"},
               "owl_wanda_l02": {"pruner": "wanda", "allocation": "owl", "scorer": "owl", "lambda": 0.2},
               "owl_sparsegpt": {"pruner": "sparsegpt", "allocation": "owl", "scorer": "owl"}}
    table = pd.DataFrame([{"method": m, "sparsity": "0.6", "target": 0.6, PPL: v, f"{PPL} sd": sd, f"{PPL} seeds": 3}
                          for m, v, sd in [("owl_wanda", 300.0, 1.0), ("owl_wanda_l02", 999.0, 9.0),
                                           ("owl_sparsegpt", 100.0, 2.0)]])
    # the two Wanda ones would share "owl": each falls back to its own name; SparseGPT's keeps "owl"
    assert allocation_labels(methods) == {"owl_wanda": "owl_wanda", "owl_wanda_l02": "owl_wanda_l02",
                                          "owl_sparsegpt": "owl"}
    glance = at_a_glance(table, methods, PPL, 3)
    assert glance.to_dict("records") == [
        {"sparsity": "0.6", "allocation": "owl_wanda", "wanda": "300 ± 1", "sparsegpt": ""},
        {"sparsity": "0.6", "allocation": "owl_wanda_l02", "wanda": "999 ± 9", "sparsegpt": ""},
        {"sparsity": "0.6", "allocation": "owl", "wanda": "", "sparsegpt": "100 ± 2"}]
