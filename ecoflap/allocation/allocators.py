"""The allocations the catalog registers, each called as fn(scores, sizes, target, **options)
-> {unit: sparsity}. The arithmetic is in ratios.py; this is only the uniform interface a
planner (plan.py) calls. A new allocation is a function of this shape (here or in a module
of its own) plus its entry in catalog.ALLOCATIONS."""
from __future__ import annotations

from ecoflap.allocation import ratios


def uniform(scores: dict[str, float], sizes: dict[str, int], target: float) -> dict[str, float]:
    return ratios.uniform(sizes, target)


def ecoflap(scores: dict[str, float], sizes: dict[str, int], target: float, max_sparsity_offset: float = 0.1,
            aggregation: str = "sum") -> dict[str, float]:
    return ratios.ecoflap(scores, sizes, target, min(target + max_sparsity_offset, 1.0), aggregation)


def owl(scores: dict[str, float], sizes: dict[str, int], target: float, lam: float = 0.08) -> dict[str, float]:
    return ratios.owl(scores, target, lam)


def alphapruning(scores: dict[str, float], sizes: dict[str, int], target: float,
                 epsilon: float = 0.3) -> dict[str, float]:
    """AlphaPruning's mapping (Lu et al. 2024; `lib/prune.py:ww_sparsity` of haiquanlu/AlphaPruning):
    each unit's alpha min-max scaled to [1 - epsilon, 1 + epsilon] (the largest alpha, the
    least trained, pruned most), then every value multiplied by the one factor that makes the
    size-weighted mean sparsity the target. Their code neither clips nor guards; here a ratio
    outside [0, 1] is an error naming the fix, and equal scores give the uniform target."""
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    lo, hi = min(scores.values()), max(scores.values())
    if hi == lo:
        return {u: target for u in sizes}
    r = {u: (scores[u] - lo) / (hi - lo) * (2 * epsilon) + (1 - epsilon) for u in sizes}
    scale = sum(sizes.values()) * target / sum(sizes[u] * r[u] for u in sizes)
    out = {u: r[u] * scale for u in sizes}
    worst = max(out.values())
    if worst > 1 or min(out.values()) < 0:
        raise ValueError(f"alphapruning at target {target} with epsilon {epsilon} asks for a sparsity of {worst:.3f} "
                         "in one unit; lower the method's epsilon (their LLaMA scripts use 0.2-0.3 at 0.7)")
    return out
