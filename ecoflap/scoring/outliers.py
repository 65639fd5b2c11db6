"""OWL's layer statistic (Yin et al. 2024): the share of a block's Wanda scores
|W_ij| * ||X_j|| above M times the block's mean, on the dense model."""
from __future__ import annotations

import torch
from torch import nn

from ecoflap.blocks.walk import feed_layers, walk_stack
from ecoflap.models.base import Adapter, Batch
from ecoflap.pruning.methods import Wanda
from ecoflap.utils.runtime import check_finite


@torch.no_grad()
def outlier_ratios(model: nn.Module, adapter: Adapter, batches: list[Batch], device: torch.device,
                   m: float = 5.0) -> dict[str, float]:
    """{block: outlier ratio in %}; Wanda's activation statistic accumulated block by block on
    the dense model (its outputs, computed in the same pass, feed the next block)."""
    wanda = Wanda()
    ratios = {}
    for stack in adapter.stacks(model):
        for step in walk_stack(model, adapter, stack, batches, device, f"OWL outlier ratios ({stack.name})"):
            layers = adapter.prunable_layers(step.block)
            stats = {n: wanda.init_stats(layer) for n, layer in layers.items()}
            feed_layers(step, layers, lambda n, x: wanda.add_batch(stats[n], x), keep_outputs=True)
            metric = torch.cat([(layer.weight.abs().float() * stats[n].sqrt().unsqueeze(0)).flatten()
                                for n, layer in layers.items()])
            # one non-finite activation anywhere in the block's calibration inputs makes the mean NaN, and
            # nothing compares above NaN: the share came out 0 % with no error (a plan from a broken model)
            check_finite(metric, f"OWL outlier metric of {step.name} (a calibration input of the dense model "
                                 "overflowed)", "score in float32 (dtype: float32), or check the calibration data")
            ratios[step.name] = (metric > m * metric.mean()).float().mean().item() * 100
    return ratios
