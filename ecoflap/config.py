"""Config validation: the JSON schema (workflow/schemas/config.schema.yaml, completed from
ecoflap/catalog.py: every name, option and default of a method comes from there) plus the
cross-references a schema cannot express. Every error names the key, the value and what
is allowed, and all of it runs before Snakemake plans a single job. `load_config` and the
workflow then fill in the defaults (`fill_defaults`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import copy
import functools
import json
import math
import re
import string

import jsonschema
import yaml

from ecoflap import catalog as C
from ecoflap.catalog import CALIBRATION_SOURCES, DATASETS, FAMILIES, IMAGE_SOURCES, TEXT_EVALS
from ecoflap.data.coop import COOP_DATASETS

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


def _kinds_schema(table: dict[str, C.Method], key: str, common: dict[str, Any]) -> list[dict[str, Any]]:
    """One if/then per kind: its options (with defaults) and nothing else besides `common`."""
    return [{"if": {"properties": {key: {"const": kind}}, "required": [key]},
             "then": {"properties": {key: {"const": kind}, **common, **C.option_schema(m.options)},
                      "additionalProperties": False}}
            for kind, m in table.items()]


def _enum(node: dict[str, Any], values: Any) -> None:
    node["enum"] = list(values)


@functools.lru_cache(maxsize=1)
def _built_schema() -> dict[str, Any]:
    schema = yaml.safe_load(SCHEMA.read_text())
    defs, props = schema["$defs"], schema["properties"]
    scorer_common = C.option_schema(C.SCORER_COMMON)
    defs["scorer"] = {"type": "object", "required": ["kind"], "description": defs["scorer"]["description"],
                      "properties": {"kind": {"enum": list(C.SCORERS), "description": "; ".join(
                          f"{k}: {m.help}" for k, m in C.SCORERS.items())}},
                      "allOf": _kinds_schema(C.SCORERS, "kind", scorer_common)}
    method_common = {
        "pruner": {"enum": [C.NO_PRUNER, *C.PRUNERS]},
        "allocation": {"enum": list(C.ALLOCATIONS), "default": "uniform"},
        "scorer": {"type": "string", "description": "a key of scorers:"},
        "nm": {"type": "boolean", "default": True,
               "description": "also run the N:M patterns of nm_patterns with this method"},
        "scope": {"enum": ["global", "submodel"], "default": "global",
                  "description": "one keep budget for the whole model (paper) or one per sub-model"},
        "submodels": {"type": "array", "minItems": 1, "items": {"enum": list(C.SUBMODELS)},
                      "description": "prune only these sub-models (default: all); the rest stay dense"},
        "dense_blocks": {"type": "array", "minItems": 1, "items": {"type": "string"},
                         "description": "blocks (layout.json names) left dense after the allocation, their budget "
                                        "not given to others, so the model ends below the target: what the authors' "
                                        "EVA-CLIP evaluation does to the last vision block (it restores its dense "
                                        "weights)"},
        "threads": {"type": "integer", "minimum": 1,
                    "description": "torch threads of this method's prune jobs (default: stage_threads.prune, else "
                                   "threads); SparseGPT's masks depend on the thread count"},
    }
    method_common["refine"] = {"enum": [C.NO_REFINE, *C.REFINERS], "default": C.NO_REFINE,
                               "description": "refine each layer's mask after its pruner, at the same sparsity: "
                               + "; ".join(f"{k}: {m.help}" for k, m in C.REFINERS.items())}
    every_option = {k: o.schema for table in (C.ALLOCATIONS, C.REFINERS) for m in table.values()
                    for k, o in m.options.items()}
    defs["method"] = {"type": "object", "required": ["pruner"], "additionalProperties": False,
                      "description": defs["method"]["description"],
                      "properties": {**method_common, **every_option},
                      # each allocation's and refiner's option defaults; another's options are accepted and unused
                      "allOf": [{"if": {"properties": {key: {"const": kind}}, "required": [key]},
                                 "then": {"properties": C.option_schema(m.options)}}
                                for key, table in (("allocation", C.ALLOCATIONS), ("refine", C.REFINERS))
                                for kind, m in table.items() if m.options]}
    _enum(defs["offload"], C.OFFLOAD_MODES)
    _enum(defs["activations"], C.ACTIVATION_PLACES)
    _enum(defs["family"], FAMILIES)
    _enum(defs["calibration_fields"]["source"], CALIBRATION_SOURCES)
    _enum(defs["calibration_fields"]["protocol"], C.CAPTION_PROTOCOLS)
    _enum(defs["calibration_fields"]["dataset"], COOP_DATASETS)
    for variant in defs["model"]["allOf"]:
        if variant["if"]["properties"]["source"]["const"] == "embedded":
            _enum(variant["then"]["properties"]["name"], C.EMBEDDED_MODELS)
    vl = defs["vl_evaluation"]["properties"]
    _enum(vl["task"], C.VL_TASKS)
    _enum(vl["dataset"], DATASETS)
    _enum(vl["protocol"], C.VQA_PROTOCOLS)
    _enum(props["dtype"], C.DTYPES)
    calib = props["calibration"]["properties"]
    for k, v in C.CALIBRATION_DEFAULTS.items():
        calib[k]["default"] = v
    pruning = props["pruning"]["properties"]
    pruning["comparison"]["properties"] = {sub: {"enum": list(C.COMPARISON_GROUPS)} for sub in C.SUBMODELS}
    for key, (pruners, option) in C.PRUNER_CONFIG_KEYS.items():
        o = C.PRUNERS[pruners[0]].options[option]
        pruning[key] = {**o.schema, "default": o.default, "description": f"{', '.join(pruners)}: {o.help}"}
    text = props["evaluation"]["properties"]
    _enum(text["perplexity"]["properties"]["dataset"], C.PERPLEXITY_DATASETS)
    for entry, defaults in C.TEXT_EVAL_DEFAULTS.items():
        for k, v in defaults.items():
            text[entry]["properties"][k]["default"] = v
    return schema


def schema() -> dict[str, Any]:
    """The complete JSON schema: the file, completed from the catalog."""
    return copy.deepcopy(_built_schema())


def _fill_properties(validator, properties, instance, schema):
    if isinstance(instance, dict):
        for key, sub in properties.items():
            if isinstance(sub, dict) and "default" in sub and key not in instance:
                instance[key] = copy.deepcopy(sub["default"])
    yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, schema)


def fill_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Set every default the schema (and so the catalog) names, in place, for a valid config:
    the kind-specific ones too (a then-branch is visited only when its kind matches)."""
    filler = jsonschema.validators.extend(_Validator, {"properties": _fill_properties})
    for _ in filler(_built_schema()).iter_errors(config):
        pass  # validate_config has reported errors already
    return config


def _schema_errors(config: dict[str, Any]) -> list[str]:
    validator = _Validator(_built_schema())
    errors = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        # report the innermost causes of if/then and $ref failures, not their wrappers
        leaves = list(err.context) if err.context else [err]
        errors.extend(_describe(e) for e in leaves)
    return errors


# results/<model>/<name>/ folders that are not a method's
RESERVED_FOLDERS = {"model": "download", "scores": "scores", "logs": "logs", "benchmarks": "benchmarks",
                    "summary": "summary"}


def _reference_errors(config: dict[str, Any]) -> list[str]:
    errors = []
    scorers = config.get("scorers", {})
    needs = {kind: scorers for kind, scorers in C.ALLOCATION_SCORERS.items() if scorers}
    calib_n = config["calibration"]["n_samples"]
    for name, m in config["methods"].items():
        alloc = m.get("allocation", "uniform")
        for key, owner in C.misplaced_options(m).items():
            errors.append(f"config key methods.{name}.{key}: an option of {owner}, which this method does not use "
                          "(allowed: its own allocation's and refiner's options)")
        if m.get("scorer") is not None and alloc not in needs:
            errors.append(f"config key methods.{name}.scorer: allocation {alloc} reads no scores (allowed: a scorer "
                          f"only with allocation {' or '.join(needs)})")
        if m["pruner"] == C.NO_PRUNER:
            continue
        if alloc in needs:
            scorer = m.get("scorer")
            if scorer not in scorers:
                errors.append(f"config key methods.{name}.scorer: {scorer!r} is not a key of scorers "
                              f"(allowed: {', '.join(map(repr, scorers)) or 'define one under scorers:'})")
            elif scorers[scorer]["kind"] not in needs[alloc]:
                errors.append(f"config key methods.{name}.scorer: {alloc} allocation needs a scorer of kind "
                              f"{' or '.join(needs[alloc])}, but {scorer!r} is {scorers[scorer]['kind']}")
            elif config.get("dtype") == "bfloat16" and C.SCORERS[scorers[scorer]["kind"]].auto_dtype:
                # the scorer refuses bfloat16 when its job runs (scoring/zeroth_order.py): said here, not
                # after the calibration and download jobs
                kind = scorers[scorer]["kind"]
                errors.append(f"config key dtype: bfloat16, but methods.{name} scores with scorers.{scorer}, a "
                              f"{kind} scorer, which refuses bfloat16 (its eps steps round away) (allowed: auto, "
                              f"which loads {C.SCORERS[kind].auto_dtype} for that scorer, float32 or float16)")
    for name, s in scorers.items():
        if s.get("n_samples", calib_n) > calib_n:
            errors.append(f"config key scorers.{name}.n_samples: {s['n_samples']} exceeds calibration.n_samples "
                          f"({calib_n}) (allowed: <= {calib_n})")
    pn = config.get("pruning", {}).get("n_samples", calib_n)
    if pn > calib_n:
        errors.append(f"config key pruning.n_samples: {pn} exceeds calibration.n_samples ({calib_n}) "
                      f"(allowed: <= {calib_n})")
    for name, spec in config["models"].items():
        if spec["source"] == "local" and not any(_is_file(Path(spec["path"]) / f)
                                                 for f in ("config.json", "open_clip_config.json")):
            errors.append(f"config key models.{name}.path: {spec['path']!r} holds no config.json (allowed: a "
                          "folder written by save_pretrained, or open_clip's with open_clip_config.json, with "
                          "safetensors weights)")
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
    seen_nm: dict[tuple[int, int], str] = {}
    for i, pat in enumerate(config.get("nm_patterns", [])):
        n, m = (int(x) for x in pat.split(":"))
        if not 0 < n < m:
            errors.append(f"config key nm_patterns[{i}]: {pat!r} needs 0 < N < M (allowed: e.g. '2:4', '4:8')")
        elif (n, m) in seen_nm:  # '02:04' is '2:4': the same masks pruned twice, listed twice
            errors.append(f"config key nm_patterns[{i}]: {pat!r} repeats {seen_nm[n, m]!r} (allowed: each pattern once)")
        seen_nm.setdefault((n, m), pat)
    for name in config["methods"]:
        if name in RESERVED_FOLDERS:
            errors.append(f"config key methods.{name}: results/<model>/{name}/ holds the model's "
                          f"{RESERVED_FOLDERS[name]} (allowed: any other name)")
    for group, members in config.get("seed_groups", {}).items():
        unknown = [m for m in members if m not in config["models"]]
        if unknown:
            errors.append(f"config key seed_groups.{group}: {unknown} are not keys of models "
                          f"(allowed: {', '.join(config['models'])})")
            continue
        identities = {json.dumps({k: v for k, v in config["models"][m].items() if k != "seed"}, sort_keys=True)
                      for m in members}
        if len(identities) > 1:
            errors.append(f"config key seed_groups.{group}: its models differ in more than their seed "
                          "(allowed: entries identical but for seed:)")
        seeds = [config["models"][m].get("seed", config.get("seed", 0)) for m in members]
        if len(set(seeds)) < len(seeds):  # one seed twice: a spread of zero, every difference a "win"
            errors.append(f"config key seed_groups.{group}: its models run seeds {seeds} (allowed: a different seed: "
                          "for each)")
    if config.get("seed_groups") and "seed_groups" in config["models"]:
        errors.append("config key models.seed_groups: results/seed_groups/ holds the seed groups' summaries "
                      "(allowed: any other model name)")
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
    tasks = FAMILIES[spec.get("family", C.DEFAULT_FAMILY)].tasks
    return [n for n, e in config["evaluation"].items() if evaluation_task(n, e) in tasks]


def _format_fields(text: str) -> int:
    try:
        return sum(field is not None for _, field, _, _ in string.Formatter().parse(text))
    except ValueError:  # an unmatched brace
        return -1


def _family_errors(config: dict[str, Any]) -> list[str]:
    errors = []
    evaluation = config.get("evaluation", {})
    for name, e in evaluation.items():
        if name in TEXT_EVALS:
            continue
        prompt = e.get("prompt")
        if e["task"] == "vqa" and prompt is not None and _format_fields(prompt) != 1:
            # str.format ignores an argument without a field: every image would get the same text
            errors.append(f"config key evaluation.{name}.prompt: {prompt!r} has {_format_fields(prompt)} {{}} fields "
                          "(allowed: exactly one {}, where the question goes)")
        dataset = DATASETS[e["dataset"]]
        if dataset.task != e["task"]:
            errors.append(f"config key evaluation.{name}.dataset: {e['dataset']!r} is a {dataset.task} "
                          f"dataset, not {e['task']} (allowed for {e['task']}: "
                          f"{', '.join(d for d, v in DATASETS.items() if v.task == e['task'])})")
        if e.get("protocol") and e["protocol"] not in dataset.protocols:
            errors.append(f"config key evaluation.{name}.protocol: {e['protocol']!r} does not score {e['dataset']} "
                          f"(allowed: {', '.join(dataset.protocols) or 'none: leave it out'})")
        for key in dataset.files:
            if not e.get(key):
                errors.append(f"config key evaluation.{name}.{key}: missing; {e['dataset']} reads "
                              f"{', '.join(dataset.files)} (README, section 'Evaluation data', says where to get them)")
    block_rerunning = {n: s for n, s in config.get("scorers", {}).items()
                       if s["kind"] == "zeroth_order" and s.get("reuse_block_inputs", True)}
    keys_read: set[str] = set()  # the top-level calibration keys some model reads
    for model, spec in config["models"].items():
        family = spec.get("family", C.DEFAULT_FAMILY)
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
            kinds = [k for k, v in CALIBRATION_SOURCES.items() if v.image == fam.image_calibration]
            want = f"{'image-caption pairs' if fam.image_calibration else 'text'} ({', '.join(kinds)})"
            errors.append(f"config key models.{model}.calibration.source: {family} calibrates on {want}, "
                          f"not {calib['source']!r}")
        source = CALIBRATION_SOURCES.get(calib["source"])
        if source is not None and source.image and fam.image_calibration:
            if fam.labelled_images and not source.labelled:
                labelled = [k for k, v in CALIBRATION_SOURCES.items() if v.labelled]
                errors.append(f"config key models.{model}.calibration.source: {family} calibrates on labelled images "
                              f"({', '.join(labelled)}), not {calib['source']!r}")
            elif not fam.labelled_images and not source.captioned:
                captioned = [k for k, v in CALIBRATION_SOURCES.items() if v.image and v.captioned]
                errors.append(f"config key models.{model}.calibration.source: {family} calibrates on image-caption "
                              f"pairs ({', '.join(captioned)}); {calib['source']!r} has class labels only")
        if calib.get("protocol", "caption") == "ecoflap" and not (
                fam.prefix_calibration or fam.encoder_decoder or (fam.labelled_images and calib["source"] == "imagenet")):
            errors.append(f"config key models.{model}.calibration.protocol: ecoflap is the authors' prefix/target "
                          f"loss of BLIP-2 and FlanT5 (or, for image classifiers, ImageNet images in folder order); "
                          f"{family} on {calib['source']} has none (allowed: caption)")
        coop_source, protocol = calib["source"] == "coop", calib.get("protocol", "caption")
        if (protocol == "coop" and not coop_source) or (coop_source and protocol not in ("coop", "caption")):
            errors.append(f"config key models.{model}.calibration.protocol: protocol coop goes with source coop "
                          f"(a CoOp data set's train split), and source coop takes protocol coop or caption")
        elif protocol == "coop" and not fam.context_padding:
            errors.append(f"config key models.{model}.calibration.protocol: coop is the authors' CLIP calibration "
                          f"(text padded to CLIP's context); {family} has none (allowed: caption)")
        if coop_source and calib.get("dataset") and calib["dataset"] not in COOP_DATASETS:
            errors.append(f"config key models.{model}.calibration.dataset: {calib['dataset']!r} is not a CoOp data "
                          f"set (allowed: {', '.join(COOP_DATASETS)})")
        read = C.calibration_keys_read(calib, fam)
        keys_read |= read
        for key, value in spec.get("calibration", {}).items():
            if key not in read and value != C.CALIBRATION_DEFAULTS.get(key, object()):
                errors.append(f"config key models.{model}.calibration.{key}: {family} on calibration source "
                              f"{calib['source']} (protocol {calib.get('protocol', 'caption')}) does not read it "
                              f"(it reads: {', '.join(sorted(read))}); remove it")
        for key in CALIBRATION_SOURCES[calib["source"]].needs:
            if not calib.get(key):
                errors.append(f"config key calibration.{key}: calibration source {calib['source']} needs it "
                              f"(set it at top level or under models.{model}.calibration)")
        for mname, m in config["methods"].items():
            if m["pruner"] == C.NO_PRUNER:
                continue
            if m.get("submodels") and not set(m["submodels"]) & set(fam.submodels):
                errors.append(f"config key methods.{mname}.submodels: none of {m['submodels']} is in {model} "
                              f"({family}) (allowed: {', '.join(fam.submodels)})")
            if not fam.single_stack and m.get("scorer") in block_rerunning and m.get("allocation") == "ecoflap":
                errors.append(f"config key scorers.{m['scorer']}.reuse_block_inputs: {family} has several stacks "
                              "of blocks; re-running from the perturbed block needs one (allowed for model "
                              f"{model}: false, or kind checkpointed / first_order)")
    families = {spec.get("family", C.DEFAULT_FAMILY) for spec in config["models"].values()}
    present = {sub for f in families for sub in FAMILIES[f].submodels}
    for sub in config.get("pruning", {}).get("comparison", {}):
        if sub not in present:
            errors.append(f"config key pruning.comparison.{sub}: no model of this config has a {sub} sub-model "
                          f"(present: {', '.join(s for s in C.SUBMODELS if s in present)}); remove it")
    for key, value in config["calibration"].items():
        overridden = key not in ("source", "n_samples") and all(  # the schema requires those two
            key in spec.get("calibration", {}) for spec in config["models"].values())
        if (key not in keys_read or overridden) and value != C.CALIBRATION_DEFAULTS.get(key, object()):
            why = "every model overrides it" if key in keys_read else \
                "no model's calibration source, protocol and family reads it"
            errors.append(f"config key calibration.{key}: {why}; remove it")
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
    """A config file, validated, with every default filled in."""
    config = yaml.safe_load(Path(path).read_text())
    validate_config(config)
    return fill_defaults(config)
