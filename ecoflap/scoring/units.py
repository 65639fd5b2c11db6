"""Scoring units: the weight tensors whose importance is summed into one allocation unit
(a whole block, or a single layer)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

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


def direction(shape: torch.Size, seed: int, batch: int, unit: int, tensor: int, device: torch.device) -> torch.Tensor:
    """The random direction z ~ N(0, I) for one weight tensor of one unit and batch, regenerated
    from (seed, batch, unit, tensor): the zeroth-order scorer and the checkpointed scorer's
    "projection" reduction use the same one."""
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + batch * 10_007 + unit) * 101 + tensor)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


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


@contextmanager
def gradients_only_for(model: nn.Module, units: list[Unit]) -> Iterator[None]:
    """Within: only the scored weights require gradients (no memory for the others'); after:
    every parameter's requires_grad as it was."""
    scored = {id(w) for u in units for w in u.weights}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in scored)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
