"""Config validation: the JSON schema (workflow/schemas/config.schema.yaml) plus the
cross-references a schema cannot express. Every error names the key, the value and what
is allowed, and all of it runs before Snakemake plans a single job."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import math
import re

import jsonschema
import yaml

from ecoflap.models.families import (DATASET_FILES, DATASET_TASK, FAMILIES, IMAGE_SOURCES, PROTOCOLS_OF_DATASET,
                                     TEXT_EVALS)

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


def _key(path: Any) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _describe(err: jsonschema.ValidationError) -> str:
    s = err.schema if isinstance(err.schema, dict) else {}
    allowed = []
    if "enum" in s:
        allowed.append("one of " + ", ".join(map(repr, s["enum"])))
    if "minimum" in s:
        allowed.append(f">= {s['minimum']}")
    if "exclusiveMinimum" in s:
        allowed.append(f"> {s['exclusiveMinimum']}")
    if "maximum" in s:
        allowed.append(f"<= {s['maximum']}")
    if "exclusiveMaximum" in s:
        allowed.append(f"< {s['exclusiveMaximum']}")
    if "pattern" in s:
        allowed.append(f"matching {s['pattern']}")
    if err.validator == "additionalProperties" and isinstance(s.get("properties"), dict):
        allowed.append("keys " + ", ".join(s["properties"]))
    msg = f"config key {_key(err.absolute_path)}: {err.message}"
    if allowed:
        msg += f" (allowed: {'; '.join(allowed)})"
    if s.get("description"):
        msg += f" [{s['description']}]"
    return msg


# JSON Schema's "integer" admits 64.0; the CLI's int() arguments do not, so neither do we
_STRICT_TYPES = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=_STRICT_TYPES)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _value_errors(node: Any, path: tuple = ()) -> list[str]:
    """What a schema cannot see: non-string keys (YAML `1:`), NaN/inf (every comparison with
    NaN is false, so NaN passes minimum/maximum), and control characters (a pattern's `$`
    also matches before a trailing newline, which then breaks paths and command lines)."""
    errors = []
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                errors.append(f"config key {_key(path + (str(k),))}: key {k!r} is a {type(k).__name__} "
                              "(allowed: names are strings; quote it in YAML)")
            elif _CONTROL.search(k):
                errors.append(f"config key {_key(path)}: name {k!r} contains a control character")
            errors += _value_errors(v, path + (str(k),))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            errors += _value_errors(v, path + (i,))
    elif isinstance(node, float) and not math.isfinite(node):
        errors.append(f"config key {_key(path)}: {node} is not a finite number")
    elif isinstance(node, str) and _CONTROL.search(node) and (not path or path[-1] != "prompt"):
        errors.append(f"config key {_key(path)}: {node!r} contains a control character (a newline?)")
    return errors


def _schema_errors(config: dict[str, Any]) -> list[str]:
    schema = yaml.safe_load(SCHEMA.read_text())
    validator = _Validator(schema)
    errors = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        # report the innermost causes of if/then and $ref failures, not their wrappers
        leaves = list(err.context) if err.context else [err]
        errors.extend(_describe(e) for e in leaves)
    return errors


def _reference_errors(config: dict[str, Any]) -> list[str]:
    errors = []
    scorers = config.get("scorers", {})
    needs = {"ecoflap": ("zeroth_order", "first_order", "checkpointed"), "owl": ("outliers",)}
    calib_n = config["calibration"]["n_samples"]
    for name, m in config["methods"].items():
        alloc = m.get("allocation", "uniform")
        if m["pruner"] == "none":
            continue
        if alloc in needs:
            scorer = m.get("scorer")
            if scorer not in scorers:
                errors.append(f"config key methods.{name}.scorer: {scorer!r} is not a key of scorers "
                              f"(allowed: {', '.join(map(repr, scorers)) or 'define one under scorers:'})")
            elif scorers[scorer]["kind"] not in needs[alloc]:
                errors.append(f"config key methods.{name}.scorer: {alloc} allocation needs a scorer of kind "
                              f"{' or '.join(needs[alloc])}, but {scorer!r} is {scorers[scorer]['kind']}")
    for name, s in scorers.items():
        if s["kind"] == "first_order" and s.get("reduce", "abs_wg") not in ("abs_g", "abs_wg"):
            errors.append(f"config key scorers.{name}.reduce: {s['reduce']!r} is not a first_order reduction "
                          "(allowed: 'abs_g', 'abs_wg'; l2 and projection need kind: checkpointed)")
        if s.get("n_samples", calib_n) > calib_n:
            errors.append(f"config key scorers.{name}.n_samples: {s['n_samples']} exceeds calibration.n_samples "
                          f"({calib_n}) (allowed: <= {calib_n})")
    pn = config.get("pruning", {}).get("n_samples", calib_n)
    if pn > calib_n:
        errors.append(f"config key pruning.n_samples: {pn} exceeds calibration.n_samples ({calib_n}) "
                      f"(allowed: <= {calib_n})")
    for name, spec in config["models"].items():
        if spec["source"] == "local" and not _is_file(Path(spec["path"]) / "config.json"):
            errors.append(f"config key models.{name}.path: {spec['path']!r} holds no config.json "
                          "(allowed: a folder written by save_pretrained, with safetensors weights)")
    labels: dict[str, float] = {}
    for i, value in enumerate(config["sparsities"]):
        label = f"{value:g}"  # the results/{model}/{method}/{label}/ folder name
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", label) or float(label) != value:
            errors.append(f"config key sparsities[{i}]: {value!r} does not name a folder exactly (as {label!r}) "
                          "(allowed: plain decimals with at most 6 significant digits, e.g. 0.5, 0.625)")
        elif label in labels:
            errors.append(f"config key sparsities[{i}]: {value!r} repeats {labels[label]!r} "
                          "(allowed: each sparsity once)")
        labels.setdefault(label, value)
    for i, pat in enumerate(config.get("nm_patterns", [])):
        n, m = (int(x) for x in pat.split(":"))
        if not 0 < n < m:
            errors.append(f"config key nm_patterns[{i}]: {pat!r} needs 0 < N < M (allowed: e.g. '2:4', '4:8')")
    if not config.get("evaluation"):
        errors.append("config key evaluation: at least one evaluation is needed")
    errors += _family_errors(config)
    return errors


def evaluation_task(name: str, entry: dict[str, Any]) -> str:
    return name if name in TEXT_EVALS else entry["task"]


def model_calibration(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The top-level calibration settings with the model's own overrides on top."""
    return {**config["calibration"], **config["models"][model].get("calibration", {})}


def model_evaluations(config: dict[str, Any], model: str) -> list[str]:
    """The evaluation entries a model runs: its `evaluate:` list, else all its family can do."""
    spec = config["models"][model]
    if "evaluate" in spec:
        return list(spec["evaluate"])
    tasks = FAMILIES[spec.get("family", "causal_lm")].tasks
    return [n for n, e in config["evaluation"].items() if evaluation_task(n, e) in tasks]


def _family_errors(config: dict[str, Any]) -> list[str]:
    errors = []
    evaluation = config.get("evaluation", {})
    for name, e in evaluation.items():
        if name in TEXT_EVALS:
            continue
        if DATASET_TASK[e["dataset"]] != e["task"]:
            errors.append(f"config key evaluation.{name}.dataset: {e['dataset']!r} is a {DATASET_TASK[e['dataset']]} "
                          f"dataset, not {e['task']} (allowed for {e['task']}: "
                          f"{', '.join(d for d, t in DATASET_TASK.items() if t == e['task'])})")
        if e.get("protocol") and e["protocol"] not in PROTOCOLS_OF_DATASET.get(e["dataset"], ()):
            errors.append(f"config key evaluation.{name}.protocol: {e['protocol']!r} does not score {e['dataset']} "
                          f"(allowed: {', '.join(PROTOCOLS_OF_DATASET.get(e['dataset'], ())) or 'none: leave it out'})")
        for key in DATASET_FILES[e["dataset"]]:
            if not e.get(key):
                errors.append(f"config key evaluation.{name}.{key}: missing; {e['dataset']} reads "
                              f"{', '.join(DATASET_FILES[e['dataset']])} (README, section 'Evaluation data', says where to get them)")
    block_rerunning = {n: s for n, s in config.get("scorers", {}).items()
                       if s["kind"] == "zeroth_order" and s.get("reuse_block_inputs", True)}
    for model, spec in config["models"].items():
        family = spec.get("family", "causal_lm")
        fam = FAMILIES[family]
        names = model_evaluations(config, model)
        if not names:
            errors.append(f"config key models.{model}.family: no evaluation entry is a task {family} can do "
                          f"(allowed tasks: {', '.join(fam.tasks)})")
        text_listed = [n for n in TEXT_EVALS if n in names]
        text_all = [n for n in TEXT_EVALS if n in evaluation]
        if text_listed and text_listed != text_all:
            errors.append(f"config key models.{model}.evaluate: lists {text_listed} but the text evaluations of a row "
                          f"run together in one job (allowed: all of {text_all}, or none)")
        for n in names:
            if n not in evaluation:
                errors.append(f"config key models.{model}.evaluate: {n!r} is not a key of evaluation "
                              f"(allowed: {', '.join(evaluation)})")
            elif evaluation_task(n, evaluation[n]) not in fam.tasks:
                errors.append(f"config key models.{model}.evaluate: {family} cannot do {n!r} "
                              f"(task {evaluation_task(n, evaluation[n])}; allowed tasks: {', '.join(fam.tasks)})")
        calib = model_calibration(config, model)
        overridden = "n_samples" in spec.get("calibration", {})  # the top-level count is checked above
        for key, n in [(f"scorers.{s}.n_samples", v.get("n_samples")) for s, v in config.get("scorers", {}).items()] \
                + [("pruning.n_samples", config.get("pruning", {}).get("n_samples"))]:
            if overridden and n is not None and n > calib["n_samples"]:
                errors.append(f"config key {key}: {n} exceeds the {calib['n_samples']} calibration samples of "
                              f"model {model} (allowed: <= {calib['n_samples']})")
        if fam.image_calibration != (calib["source"] in IMAGE_SOURCES):
            want = "image-caption pairs (cc3m or coco)" if fam.image_calibration else "text (austen-emma or c4)"
            errors.append(f"config key models.{model}.calibration.source: {family} calibrates on {want}, "
                          f"not {calib['source']!r}")
        if calib.get("protocol", "caption") == "ecoflap" and not fam.prefix_calibration:
            errors.append(f"config key models.{model}.calibration.protocol: ecoflap is the authors' BLIP-2 captioning "
                          f"loss; {family} has none (allowed: caption)")
        need = {"cc3m": ("pairs",), "coco": ("captions", "image_dir")}.get(calib["source"], ())
        for key in need:
            if not calib.get(key):
                errors.append(f"config key calibration.{key}: calibration source {calib['source']} needs it "
                              f"(set it at top level or under models.{model}.calibration)")
        for mname, m in config["methods"].items():
            if m["pruner"] == "none":
                continue
            if m.get("submodels") and not set(m["submodels"]) & set(fam.submodels):
                errors.append(f"config key methods.{mname}.submodels: none of {m['submodels']} is in {model} "
                              f"({family}) (allowed: {', '.join(fam.submodels)})")
            if not fam.single_stack and m.get("scorer") in block_rerunning and m.get("allocation") == "ecoflap":
                errors.append(f"config key scorers.{m['scorer']}.reuse_block_inputs: {family} has several stacks "
                              "of blocks; re-running from the perturbed block needs one (allowed for model "
                              f"{model}: false, or kind checkpointed / first_order)")
    return errors


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def validate_config(config: dict[str, Any]) -> None:
    """Raise ConfigError listing every problem, or return silently."""
    if not isinstance(config, dict):
        raise ConfigError(f"invalid configuration: the top level is a {type(config).__name__}, not a mapping")
    errors = _value_errors(config) or _schema_errors(config)
    if not errors:
        errors = _reference_errors(config)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def load_config(path: str | Path) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    validate_config(config)
    return config
