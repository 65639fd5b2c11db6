"""The catalog is the one list of names, options and defaults: the schema, the config check,
the CLI and the implementations agree with it, and a new scorer is one module plus one entry."""
from __future__ import annotations

import argparse
import copy
import inspect
import json

import pytest
import yaml

from conftest import REPO
from ecoflap import catalog
from ecoflap import config as config_module
from ecoflap.cli import build_parser, main
from ecoflap.config import ConfigError, fill_defaults, schema, validate_config

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())
TABLES = {"scorers": catalog.SCORERS, "allocations": catalog.ALLOCATIONS, "pruners": catalog.PRUNERS,
          "refiners": catalog.REFINERS}


def _enum_of(node):
    return node["enum"]


def test_schema_enums_equal_the_catalog():
    s = schema()
    defs, props = s["$defs"], s["properties"]
    assert _enum_of(defs["scorer"]["properties"]["kind"]) == list(catalog.SCORERS)
    assert _enum_of(defs["method"]["properties"]["allocation"]) == list(catalog.ALLOCATIONS)
    assert _enum_of(defs["method"]["properties"]["pruner"]) == [catalog.NO_PRUNER, *catalog.PRUNERS]
    assert _enum_of(defs["method"]["properties"]["refine"]) == [catalog.NO_REFINE, *catalog.REFINERS]
    assert defs["method"]["properties"]["submodels"]["items"]["enum"] == list(catalog.SUBMODELS)
    assert _enum_of(defs["family"]) == list(catalog.FAMILIES)
    assert _enum_of(defs["offload"]) == list(catalog.OFFLOAD_MODES)
    assert _enum_of(defs["calibration_fields"]["source"]) == list(catalog.CALIBRATION_SOURCES)
    assert _enum_of(defs["calibration_fields"]["protocol"]) == list(catalog.CAPTION_PROTOCOLS)
    assert _enum_of(defs["vl_evaluation"]["properties"]["dataset"]) == list(catalog.DATASETS)
    assert _enum_of(defs["vl_evaluation"]["properties"]["task"]) == list(catalog.VL_TASKS)
    assert _enum_of(props["evaluation"]["properties"]["perplexity"]["properties"]["dataset"]) == \
        list(catalog.PERPLEXITY_DATASETS)
    # each kind's options, with the catalog's defaults, and nothing else
    for kind, method in catalog.SCORERS.items():
        branch = next(b["then"] for b in defs["scorer"]["allOf"] if b["if"]["properties"]["kind"]["const"] == kind)
        assert set(branch["properties"]) == {"kind", *method.options, *catalog.SCORER_COMMON}
        for name, option in method.options.items():
            assert branch["properties"][name]["default"] == option.default, (kind, name)


def test_the_schema_file_lists_no_catalog_name():
    """The file holds no enum the catalog owns (so the two cannot drift apart): only the model
    source (embedded/hub/local) and ImageNet's prompt templates are listed there."""
    raw = (REPO / "workflow/schemas/config.schema.yaml").read_text()
    enums = [line.strip() for line in raw.splitlines() if "enum:" in line]
    assert len(enums) == 2 and "embedded, hub, local" in enums[0] and "ensemble, simple, coop" in enums[1], enums


def test_implementations_match_the_catalog():
    """Every entry imports; its function takes the catalog's options; a default it declares
    is the catalog's default (the drift the restructure removed: zeroth-order granularity,
    checkpointed reduce)."""
    for title, table in TABLES.items():
        for name, method in table.items():
            impl = method.load()
            params = inspect.signature(impl).parameters
            for option, value in method.arguments(method.defaults()).items():
                assert option in params, f"{title}.{name}: {impl.__name__} takes no {option!r}"
                declared = params[option].default
                if declared is not inspect.Parameter.empty:
                    declared = list(declared) if isinstance(declared, tuple) else declared
                    assert declared == value, f"{title}.{name}.{option}: code {declared!r}, catalog {value!r}"
            if title == "scorers":
                assert ("seed" in params) == method.seeded, name
                assert ("targets" in params) == method.needs_targets, name


def _choices(subcommand: str, flag: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[subcommand]
    return next(a for a in sub._actions if flag in a.option_strings).choices


def test_cli_choices_come_from_the_catalog():
    assert list(_choices("score", "--kind")) == list(catalog.SCORERS)
    assert list(_choices("allocate", "--kind")) == list(catalog.ALLOCATIONS)
    assert list(_choices("prune", "--pruner")) == list(catalog.PRUNERS)
    assert list(_choices("prune", "--refine")) == [catalog.NO_REFINE, *catalog.REFINERS]
    assert list(_choices("calibrate", "--source")) == list(catalog.CALIBRATION_SOURCES)
    assert list(_choices("score", "--family")) == list(catalog.FAMILIES)
    assert list(_choices("prune", "--offload")) == list(catalog.OFFLOAD_MODES)


def test_defaults_are_filled_per_kind():
    cfg = copy.deepcopy(DEFAULT)
    cfg["scorers"] = {"z": {"kind": "zeroth_order"}, "o": {"kind": "outliers"}, "c": {"kind": "checkpointed"}}
    cfg["methods"] = {"e": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "c"},
                      "w": {"pruner": "wanda", "allocation": "owl", "scorer": "o"}, "u": {"pruner": "magnitude"},
                      "d": {"pruner": "sparsegpt", "refine": "dsnot", "max_cycles": 10}}
    validate_config(cfg)
    fill_defaults(cfg)
    assert cfg["scorers"]["z"] == {"kind": "zeroth_order", "granularity": "block", "eps": 1e-3,
                                   "reuse_block_inputs": True, "perturb": "unit", "batch_size": 8}
    assert cfg["scorers"]["o"] == {"kind": "outliers", "m": 5.0, "batch_size": 8}
    assert cfg["scorers"]["c"]["reduce"] == "abs_wg"
    assert cfg["methods"]["e"]["max_sparsity_offset"] == 0.1 and "lambda" not in cfg["methods"]["e"]
    assert cfg["methods"]["w"]["lambda"] == 0.08 and "aggregation" not in cfg["methods"]["w"]
    assert cfg["methods"]["u"]["allocation"] == "uniform" and cfg["pruning"]["sparsegpt_damp"] == 0.01
    assert cfg["methods"]["u"]["refine"] == "none" and "max_cycles" not in cfg["methods"]["u"]
    assert cfg["methods"]["d"]["max_cycles"] == 10 and cfg["methods"]["d"]["skip_layers"] == ["mlp"]
    assert cfg["calibration"]["seq_len"] == DEFAULT["calibration"].get("seq_len", 128)


def test_an_option_of_another_kind_is_refused_with_the_allowed_keys():
    cfg = copy.deepcopy(DEFAULT)
    cfg["scorers"] = {"z": {"kind": "zeroth_order", "reduce": "l2"}}
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "scorers.z" in str(err.value) and "'reduce' was unexpected" in str(err.value) and "eps" in str(err.value)
    cfg["scorers"] = {"f": {"kind": "first_order", "reduce": "l2"}}
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "scorers.f.reduce" in str(err.value) and "'abs_wg'" in str(err.value)


def test_a_stage_spec_run_by_hand_is_checked_like_the_config(tmp_path, tiny_dir, caplog):
    """The CLI kept only the catalog's options of a --spec and dropped the rest: a typo'd
    max_sparsity_offest ran with the default, OWL's lambda on a uniform method did nothing,
    --target nan was planned and written, @<a folder> was a traceback."""
    layout = {f"b.{i}": {f"b.{i}.fc": 100} for i in range(3)}
    (tmp_path / "layout.json").write_text(json.dumps({"layout": layout}))
    (tmp_path / "zo.json").write_text(json.dumps({"kind": "zeroth_order", "granularity": "block",
                                                  "scores": {b: 1.0 + i for i, b in enumerate(layout)}}))
    out = tmp_path / "allocation.json"
    allocate = ["allocate", "--layout", str(tmp_path / "layout.json"), "--scores", str(tmp_path / "zo.json"),
                "--out", str(out)]
    refusals = {
        ('{"allocation": "ecoflap", "max_sparsity_offest": 0.3}', "0.5"): "'max_sparsity_offest' (unknown)",
        ('{"allocation": "uniform", "lambda": 0.1}', "0.5"): "'lambda' (an option of allocation owl)",
        ('{"allocation": "owl"}', "0.5"): "reads scores of kind outliers, but the scores file holds 'zeroth_order'",
        ('{"allocation": "ecoflap"}', "nan"): "--target must be a sparsity in [0, 1), got nan",
        (f"@{tmp_path}", "0.5"): "cannot read it",
    }
    for (spec, target), message in refusals.items():
        caplog.clear()
        with pytest.raises(SystemExit):
            main([*allocate, "--spec", spec, "--target", target])
        assert message in caplog.text and not out.exists(), spec
    main([*allocate, "--spec", '{"allocation": "ecoflap", "max_sparsity_offset": 0.3, "pruner": "wanda"}',
          "--target", "0.5"])
    assert json.loads(out.read_text())["options"]["max_sparsity_offset"] == 0.3
    with pytest.raises(SystemExit):
        main(["score", "--model", str(tiny_dir), "--calibration", str(tmp_path / "none.safetensors"), "--spec",
              '{"kind": "zeroth_order", "reduce": "l2"}', "--out", str(tmp_path / "s.json")])
    assert "'reduce' (unknown)" in caplog.text and "eps" in caplog.text


# --- a new scorer: one module (here, this test's function) and one catalog entry ------------------

def weight_norm_scores(model, adapter, batches, device, power: float = 2.0):
    """A stand-in for a contributor's scorer: the sum of |w|^power per block."""
    return {name: float(sum(layer.weight.detach().abs().pow(power).sum()
                            for layer in adapter.prunable_layers(block).values()))
            for name, block in adapter.named_blocks(model)}


@pytest.fixture()
def new_scorer(monkeypatch):
    entry = catalog.Method(f"{__name__}:weight_norm_scores", "sum of |w|^power per block",
                           {"power": catalog.Option(2.0, {"type": "number", "exclusiveMinimum": 0})})
    monkeypatch.setitem(catalog.SCORERS, "weight_norm", entry)
    monkeypatch.setitem(catalog.ALLOCATION_SCORERS, "ecoflap", (*catalog.ALLOCATION_SCORERS["ecoflap"], "weight_norm"))
    config_module._built_schema.cache_clear()
    yield
    config_module._built_schema.cache_clear()


def test_a_new_scorer_is_one_module_and_one_catalog_entry(new_scorer, tiny_dir, tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["scorers"] = {"norms": {"kind": "weight_norm", "power": 1.0}}
    cfg["methods"] = {"eco": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "norms"}}
    validate_config(cfg)  # the schema and the config check know it
    with pytest.raises(ConfigError, match="power"):
        validate_config({**cfg, "scorers": {"norms": {"kind": "weight_norm", "power": -1}}})
    from ecoflap.data.calibration import build_calibration, save_calibration
    from transformers import AutoTokenizer

    calib = tmp_path / "calib.safetensors"
    ids = build_calibration(AutoTokenizer.from_pretrained(tiny_dir), "austen-emma", 4, 32, 0)
    save_calibration(calib, ids, {"source": "austen-emma"})
    out = tmp_path / "scores.json"
    main(["--threads", "1", "score", "--model", str(tiny_dir), "--calibration", str(calib), "--device", "cpu",
          "--spec", json.dumps(cfg["scorers"]["norms"]), "--out", str(out)])
    scores = json.loads(out.read_text())
    assert scores["kind"] == "weight_norm" and scores["provenance"]["config"]["power"] == 1.0
    assert len(scores["scores"]) == 3 and all(v > 0 for v in scores["scores"].values())
