"""Per-unit sparsity ratios from scores: uniform, ECoFLaP's score-proportional keep budget,
and OWL's outlier-weighted ratios. Units are blocks or layers; sizes are weight counts."""
from __future__ import annotations

import math


def uniform(sizes: dict[str, int], target: float) -> dict[str, float]:
    return {u: target for u in sizes}


def ecoflap_keep_counts(scores: dict[str, float], sizes: dict[str, int], target: float,
                        max_sparsity: float) -> dict[str, int]:
    """Weights kept per unit (ECoFLaP): every unit keeps at least (1 - max_sparsity) of its
    weights; the rest of the keep budget (1 - target) * total is shared in proportion to
    the scores, capped at each unit's size, with what a capped unit cannot take handed to
    the others, until the kept count is exact (integer remainders by largest fraction)."""
    _check(scores, sizes, target)
    if max_sparsity < target:
        raise ValueError(f"max_sparsity ({max_sparsity}) must be >= the target sparsity ({target})")
    units = list(sizes)
    total = sum(sizes.values())
    budget = round((1 - target) * total)
    # floor of the minimum keep: with integer rounding the floors then never exceed the budget
    floor = {u: math.floor((1 - min(max_sparsity, 1.0)) * sizes[u] + 1e-9) for u in units}
    left = budget - sum(floor.values())
    cap = {u: sizes[u] - floor[u] for u in units}
    if left > 0 and not any(scores[u] > 0 for u in units if cap[u] > 0):
        # the sharing below would fall back to free capacity: a plan that looks like ECoFLaP's from no signal
        raise ValueError("every unit's score is 0, so ECoFLaP has nothing to share the keep budget by (the scorer saw "
                         "no gradient: check that the calibration loss reaches the blocks); rerun the scorer")
    share = {u: 0.0 for u in units}
    open_units = [u for u in units if cap[u] > 0]
    remaining = float(left)
    while remaining > 1e-9 and open_units:
        weight = {u: scores[u] for u in open_units}
        if sum(weight.values()) <= 0:  # no score signal left: share by free capacity
            weight = {u: float(cap[u] - share[u]) for u in open_units}
        wsum = sum(weight.values())
        offer = {u: remaining * weight[u] / wsum for u in open_units}
        capped = [u for u in open_units if share[u] + offer[u] >= cap[u]]
        if not capped:
            for u in open_units:
                share[u] += offer[u]
            remaining = 0.0
            break
        for u in capped:  # fill capped units exactly, then share the rest again
            remaining -= cap[u] - share[u]
            share[u] = float(cap[u])
        open_units = [u for u in open_units if u not in capped]
    keep = {u: floor[u] + math.floor(share[u]) for u in units}
    short = budget - sum(keep.values())
    by_fraction = sorted((u for u in units if keep[u] < sizes[u]), key=lambda u: (-(share[u] % 1), units.index(u)))
    for u in by_fraction[:short]:
        keep[u] += 1
    assert sum(keep.values()) == budget and all(floor[u] <= keep[u] <= sizes[u] for u in units)
    return keep


def ecoflap(scores: dict[str, float], sizes: dict[str, int], target: float, max_sparsity: float,
            aggregation: str = "sum") -> dict[str, float]:
    """aggregation 'avg' divides each unit's score by its weight count before sharing."""
    if aggregation not in ("sum", "avg"):
        raise ValueError(f"aggregation must be 'sum' or 'avg', got {aggregation!r}")
    if aggregation == "avg":
        scores = {u: scores[u] / sizes[u] for u in sizes}
    keep = ecoflap_keep_counts(scores, sizes, target, max_sparsity)
    return {u: 1 - keep[u] / sizes[u] for u in sizes}


def owl(outlier_ratio: dict[str, float], target: float, lam: float = 0.08,
        sizes: dict[str, int] | None = None) -> dict[str, float]:
    """OWL: keep ratios spread over 2 * lam by outlier share (min-max scaled), then shifted so
    that their mean is 1 - target. Their code (`lib/prune_all.py`) shifts by the plain mean,
    which is the size-weighted one when every block has the same size (a decoder LM); with
    `sizes`, the shift is size-weighted, so models whose blocks differ in size (T5, BLIP-2's
    towers) still reach the target. Target 0 keeps every unit dense. Their code neither clips
    nor guards; here a ratio outside [0, 1) (target + lam near 1) is an error naming the fix,
    not a clip that would silently miss the target."""
    sizes = sizes or {u: 1 for u in outlier_ratio}
    _check(outlier_ratio, sizes, target)
    lo, hi = min(outlier_ratio.values()), max(outlier_ratio.values())
    if hi == lo or target == 0:  # at target 0 the only ratios in [0, 1) with mean 0 are all 0
        return {u: target for u in outlier_ratio}
    scaled = {u: (d - lo) / (hi - lo) * 2 * lam for u, d in outlier_ratio.items()}
    mean = sum(scaled[u] * sizes[u] for u in scaled) / sum(sizes.values())
    sparsity = {u: 1 - (s - mean + (1 - target)) for u, s in scaled.items()}
    low, high = min(sparsity, key=sparsity.get), max(sparsity, key=sparsity.get)
    if sparsity[low] < 0 or sparsity[high] >= 1:
        worst = low if sparsity[low] < 0 else high
        raise ValueError(f"owl at target {target} with lambda {lam} asks for a sparsity of {sparsity[worst]:.3f} in "
                         f"{worst} (outside [0, 1)); lower the method's lambda (below {min(target, 1 - target) / 2:.3g} "
                         "always fits: no ratio then moves more than 2 lambda from the target)")
    return sparsity


def _check(scores: dict[str, float], sizes: dict, target: float) -> None:
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    if set(scores) != set(sizes):
        raise ValueError("scores and sizes name different units")
    for u, s in scores.items():
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"score of {u} is {s}; scores must be finite and >= 0 (rerun scoring with a smaller eps)")


def expand_to_layers(unit_sparsity: dict[str, float], layout: dict[str, dict[str, int]]) -> dict[str, float]:
    """Block-level ratios apply to every layer of the block; layer-level ones pass through."""
    out = {}
    for block, layers in layout.items():
        for layer in layers:
            if layer in unit_sparsity:
                out[layer] = unit_sparsity[layer]
            elif block in unit_sparsity:
                out[layer] = unit_sparsity[block]
            else:
                raise KeyError(f"no ratio for {layer} or its block {block}; scores and model do not match")
    return out


def unit_sizes(layout: dict[str, dict[str, int]], granularity: str) -> dict[str, int]:
    if granularity == "block":
        return {block: sum(layers.values()) for block, layers in layout.items()}
    return {layer: n for layers in layout.values() for layer, n in layers.items()}


def select_submodels(layout: dict[str, dict[str, int]], submodel_of_block: dict[str, str],
                     submodels: list[str] | None) -> dict[str, dict[str, int]]:
    """The blocks of the sub-models to prune (all when `submodels` is empty); the others
    stay dense and out of the budget. Names the model lacks are ignored (one method list
    serves a BLIP-2 with a language model and its retrieval model without one)."""
    if not submodels:
        return layout
    present = sorted(set(submodel_of_block.values()))
    if not set(submodels) & set(present):
        raise ValueError(f"none of the sub-models {submodels} is in this model (it has {present})")
    return {b: layers for b, layers in layout.items() if submodel_of_block[b] in submodels}


def per_group(allocate, scores: dict[str, float], sizes: dict[str, int], group_of_unit: dict[str, str]
              ) -> dict[str, float]:
    """Run `allocate(scores, sizes)` separately within each group (one budget per sub-model),
    so every group reaches the target on its own."""
    out: dict[str, float] = {}
    for g in sorted(set(group_of_unit.values())):
        units = [u for u in sizes if group_of_unit[u] == g]
        out.update(allocate({u: scores[u] for u in units}, {u: sizes[u] for u in units}))
    return out
