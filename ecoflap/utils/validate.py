"""Checks on the intermediate files one stage hands to the next (layout, scores, allocation,
pruning report), made where they are read: a bad value stops the reading stage with a message
naming the file, the key, the value and the rule that writes the file, instead of an index
error deep inside a pruner or a silently wrong mask."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

WRITER = {"layout": "download_model", "scores": "score", "allocation": "allocate", "pruning": "prune"}


class IntermediateError(ValueError):
    pass


def _fail(path: str | Path, kind: str, key: str, value: Any, allowed: str) -> IntermediateError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return IntermediateError(f"{path}: {key} = {shown} ({allowed}); this {kind} file is not valid. Delete it and "
                             f"rerun the {WRITER[kind]} rule that writes it")


def _mapping(data: Any, path: str | Path, kind: str, key: str) -> dict:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, dict) or not value:
        raise _fail(path, kind, key, value, "expected a non-empty mapping")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_layout(data: Any, path: str | Path) -> dict:
    layout = _mapping(data, path, "layout", "layout")
    for block, layers in layout.items():
        if not isinstance(layers, dict) or not layers:
            raise _fail(path, "layout", f"layout[{block!r}]", layers, "expected a mapping of layers to sizes")
        for layer, n in layers.items():
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise _fail(path, "layout", f"layout[{block!r}][{layer!r}]", n, "expected a positive weight count")
            if not layer.startswith(block + "."):
                raise _fail(path, "layout", f"layout[{block!r}]", layer, "a layer must belong to its block")
    subs = data.get("submodel_of_block")
    if subs is not None and set(subs) != set(layout):
        raise _fail(path, "layout", "submodel_of_block", sorted(set(subs) ^ set(layout))[:3],
                    "must name exactly the blocks of layout")
    return data


def check_scores(data: Any, path: str | Path, units: set[str] | None = None) -> dict:
    scores = _mapping(data, path, "scores", "scores")
    if data.get("granularity") not in ("block", "layer"):
        raise _fail(path, "scores", "granularity", data.get("granularity"), "allowed: block, layer")
    for unit, value in scores.items():
        if not _number(value) or value < 0:
            raise _fail(path, "scores", f"scores[{unit!r}]", value, "a score must be a finite number >= 0")
    if units is not None:
        missing, unknown = sorted(units - set(scores)), sorted(set(scores) - units)
        if missing or unknown:
            raise _fail(path, "scores", "scores", {"missing": missing[:3], "not in the model": unknown[:3]},
                        "must score exactly the model's units; was it computed for another model?")
    return data


def check_allocation(data: Any, path: str | Path, layers: set[str] | None = None) -> dict:
    """Ratios finite and in [0, 1), every layer one the model has (and, with `layers`, every
    block either wholly allocated or wholly left out, which the engine checks per block)."""
    ratios = _mapping(data, path, "allocation", "layer_sparsity")
    target = data.get("target")
    if not _number(target) or not 0 <= target < 1:
        raise _fail(path, "allocation", "target", target, "a sparsity must be finite and in [0, 1)")
    for layer, value in ratios.items():
        if not _number(value) or not 0 <= value < 1:
            raise _fail(path, "allocation", f"layer_sparsity[{layer!r}]", value,
                        "a sparsity must be finite and in [0, 1)")
    if layers is not None:
        unknown = sorted(set(ratios) - layers)
        if unknown:
            raise _fail(path, "allocation", "layer_sparsity", unknown[:3],
                        "names layers this model does not have; was it made for another model?")
    return data


def check_pruning_report(data: Any, path: str | Path) -> dict:
    ratios = _mapping(data, path, "pruning", "layer_sparsity")
    for layer, value in ratios.items():
        if not _number(value) or not 0 <= value <= 1:
            raise _fail(path, "pruning", f"layer_sparsity[{layer!r}]", value, "an achieved sparsity is in [0, 1]")
    for key in ("global_sparsity", "target"):
        if not _number(data.get(key)):
            raise _fail(path, "pruning", key, data.get(key), "expected a finite number")
    if not isinstance(data.get("mask_sha256"), str) or len(data["mask_sha256"]) != 64:
        raise _fail(path, "pruning", "mask_sha256", data.get("mask_sha256"), "expected a SHA-256 hex digest")
    return data
