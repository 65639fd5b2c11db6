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
    return ratios.owl(scores, target, lam, sizes)


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


def atp(scores: dict[str, float], sizes: dict[str, int], target: float, step: float | None = None) -> dict[str, float]:
    """ATP's arithmetic progression (Huang et al., ICML 2025; `main.py` of wzhuang-xmu/ATP):
    sparsity rising by `step` per block with depth, mean equal to the target. `scores` are
    the units' depths (the atp_search scorer's output: each block's index within its stack,
    centred on its stack's middle, all shifted by one constant), so s_u = target + step * (depth_u - mean depth), the mean
    weighted by size; for one stack of equal blocks this is their target - step (L - 1) / 2
    + i step exactly. Like their code it never clips: a step that would push a block below 0
    or to 100 % is an error (their "Illegal beta"; they let a block reach 100 %, the
    allocation checks here do not)."""
    if step is None:
        raise ValueError("atp allocation needs a step: set methods.<name>.step, or use an atp_search scorer "
                         "whose grid search chose one for this target")
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    centre = sum(sizes[u] * scores[u] for u in sizes) / sum(sizes.values())
    out = {u: target + step * (scores[u] - centre) for u in sizes}
    if max(out.values()) >= 1 - 1e-9 or min(out.values()) < -1e-9:
        raise ValueError(f"atp step {step} at target {target} asks for sparsities from {min(out.values()):.3f} to "
                         f"{max(out.values()):.3f}; steps must stay below {atp_max_step(scores, sizes, target):.5f}")
    return {u: min(max(v, 0.0), 1.0) for u, v in out.items()}


def atp_max_step(scores: dict[str, float], sizes: dict[str, int], target: float) -> float:
    """The bound on the step: every unit within [0, 1] (their min(2S, 2(1 - S)) / (L - 1));
    a step below it keeps every unit under 100 %."""
    centre = sum(sizes[u] * scores[u] for u in sizes) / sum(sizes.values())
    above = max(scores[u] - centre for u in sizes)
    below = max(centre - scores[u] for u in sizes)
    if above <= 0 or below <= 0:
        return 0.0
    return min((1 - target) / above, target / below)
