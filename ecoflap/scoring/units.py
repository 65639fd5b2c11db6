"""Scoring units: the weight tensors whose importance is summed into one allocation unit
(a whole block, or a single layer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecoflap.models.base import Adapter


@dataclass
class Unit:
    name: str
    block_index: int
    weights: list[nn.Parameter]


def first_order_term(g: torch.Tensor, w: torch.Tensor, reduce: str) -> float:
    """sum |g| ("abs_g") or sum |w * g| ("abs_wg") of one weight tensor's gradient."""
    g = g.float()
    return (g * w.float()).abs().sum().item() if reduce == "abs_wg" else g.abs().sum().item()


def scoring_units(model: nn.Module, adapter: Adapter, granularity: str) -> list[Unit]:
    if granularity not in ("block", "layer"):
        raise ValueError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    units = []
    for b, (prefix, block) in enumerate(adapter.named_blocks(model)):
        layers = adapter.prunable_layers(block)
        if granularity == "block":
            units.append(Unit(prefix, b, [layer.weight for layer in layers.values()]))
        else:
            units.extend(Unit(f"{prefix}.{n}", b, [layer.weight]) for n, layer in layers.items())
    return units
