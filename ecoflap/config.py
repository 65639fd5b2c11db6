"""Config validation: the JSON schema (workflow/schemas/config.schema.yaml) plus the
cross-references a schema cannot express. Every error names the key, the value and what
is allowed, and all of it runs before Snakemake plans a single job."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

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


def _schema_errors(config: dict[str, Any]) -> list[str]:
    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
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
        if spec["source"] == "local" and not (Path(spec["path"]) / "config.json").is_file():
            errors.append(f"config key models.{name}.path: {spec['path']!r} holds no config.json "
                          "(allowed: a folder written by save_pretrained, with safetensors weights)")
    for i, pat in enumerate(config.get("nm_patterns", [])):
        n, m = (int(x) for x in pat.split(":"))
        if not 0 < n < m:
            errors.append(f"config key nm_patterns[{i}]: {pat!r} needs 0 < N < M (allowed: e.g. '2:4', '4:8')")
    if not config.get("evaluation"):
        errors.append("config key evaluation: at least one of perplexity, lm_eval is needed")
    return errors


def validate_config(config: dict[str, Any]) -> None:
    """Raise ConfigError listing every problem, or return silently."""
    errors = _schema_errors(config)
    if not errors:
        errors = _reference_errors(config)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def load_config(path: str | Path) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    validate_config(config)
    return config
