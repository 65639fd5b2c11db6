"""OWL's layer statistic (Yin et al. 2024): the share of a block's Wanda scores
|W_ij| * ||X_j|| above M times the block's mean, on the dense model."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.adapters import DecoderAdapter
from ecoflap.pruning.capture import capture_block_inputs, run_block
from ecoflap.pruning.methods import Wanda


@torch.no_grad()
def outlier_ratios(model: nn.Module, adapter: DecoderAdapter, batches: list[torch.Tensor], device: torch.device,
                   m: float = 5.0) -> dict[str, float]:
    wanda = Wanda()
    inputs = capture_block_inputs(model, adapter, batches, device)
    ratios = {}
    for b, block in enumerate(tqdm(adapter.blocks(model), desc="OWL outlier ratios", unit="block")):
        layers = adapter.prunable_layers(block)
        stats = {n: wanda.init_stats(layer) for n, layer in layers.items()}
        hooks = [layer.register_forward_hook(lambda _m, a, _o, n=n: wanda.add_batch(stats[n], a[0]))
                 for n, layer in layers.items()]
        outputs = [inp.with_hidden(run_block(block, inp)) for inp in inputs]
        for h in hooks:
            h.remove()
        metric = torch.cat([(layer.weight.abs().float() * stats[n].sqrt().unsqueeze(0)).flatten()
                            for n, layer in layers.items()])
        ratios[adapter.block_name(b)] = (metric > m * metric.mean()).float().mean().item() * 100
        inputs = outputs
    return ratios
