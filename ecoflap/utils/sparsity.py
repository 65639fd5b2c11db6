"""Size-weighted sparsity over layers, overall or per group (sub-model): the one place the
plan, the pruning report and the summary compute it."""
from __future__ import annotations


def weighted_sparsity(layer_sparsity: dict[str, float], layer_size: dict[str, int]) -> float:
    """Sparsity over the layers `layer_size` names, weighted by their sizes."""
    return sum(layer_sparsity[k] * n for k, n in layer_size.items()) / sum(layer_size.values())


def sparsity_by_group(layer_sparsity: dict[str, float], layer_size: dict[str, int],
                      group_of_layer: dict[str, str]) -> dict[str, float]:
    """Sparsity of each group of layers (e.g. each sub-model), weighted by layer size."""
    zeros: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for k, n in layer_size.items():
        g = group_of_layer[k]
        zeros[g] = zeros.get(g, 0.0) + layer_sparsity[k] * n
        sizes[g] = sizes.get(g, 0) + n
    return {g: zeros[g] / sizes[g] for g in sizes}
