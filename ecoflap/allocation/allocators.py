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
