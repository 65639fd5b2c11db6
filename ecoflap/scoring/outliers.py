"""OWL's layer statistic (Yin et al. 2024): the share of a block's Wanda scores
|W_ij| * ||X_j|| above M times the block's mean, on the dense model."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.base import Adapter, Batch
from ecoflap.models.offload import resident
from ecoflap.pruning.capture import capture_stack_inputs, run_block
from ecoflap.pruning.methods import Wanda


@torch.no_grad()
def outlier_ratios(model: nn.Module, adapter: Adapter, batches: list[Batch], device: torch.device,
                   m: float = 5.0) -> dict[str, float]:
    wanda = Wanda()
    ratios = {}
    for stack in adapter.stacks(model):
        inputs = capture_stack_inputs(model, adapter, stack, batches, device)
        hidden = [per_block[0].hidden for per_block in inputs]
        blocks = adapter.stack_blocks(model, stack)
        for j, block in enumerate(tqdm(blocks, desc=f"OWL outlier ratios ({stack.name})", unit="block")):
            with resident(block):  # offload: cpu; statistics are made on the block's device
                ratios[f"{stack.path}.{j}"], hidden = _block_ratio(block, adapter, wanda, inputs, hidden, j, m)
    return ratios


def _block_ratio(block: nn.Module, adapter: Adapter, wanda: Wanda, inputs: list, hidden: list, j: int,
                 m: float) -> tuple[float, list]:
    """Block j's outlier ratio (in %), and its outputs: the next block's inputs."""
    layers = adapter.prunable_layers(block)
    stats = {n: wanda.init_stats(layer) for n, layer in layers.items()}
    running = []  # the input being run, so hooks can drop its padding
    hooks = [layer.register_forward_hook(
        lambda _m, a, _o, n=n: wanda.add_batch(stats[n], running[-1].real_positions(a[0])))
        for n, layer in layers.items()]
    outputs = []
    try:
        for per_block, h in zip(inputs, hidden):
            running.append(per_block[j].with_hidden(h))
            outputs.append(run_block(block, running[-1]))
    finally:
        for h in hooks:
            h.remove()
    metric = torch.cat([(layer.weight.abs().float() * stats[n].sqrt().unsqueeze(0)).flatten()
                        for n, layer in layers.items()])
    return (metric > m * metric.mean()).float().mean().item() * 100, outputs
