"""The sequential layer-wise engine. Stack by stack in data-flow order (a language model
has one; BLIP-2 has vision, Q-Former and language stacks), block by block (blocks/walk.py):
collect the calibration statistics of the block's layers on the outputs of the already
pruned blocks before it (the pruner's add_batch), prune each layer at its allocated ratio
(the pruner's prune), then the walk recomputes the block's outputs for the next block. A
stack's inputs are captured by running the model, so the language model of a
vision-language model is calibrated on what the already pruned vision side produces."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ecoflap.blocks.walk import BlockStep, feed_layers, walk_stack
from ecoflap.models.base import Adapter, Batch
from ecoflap.models.offload import offload_mode
from ecoflap.utils.runtime import check_finite
from ecoflap.utils.sparsity import sparsity_by_group, weighted_sparsity

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    layer_size: dict[str, int] = field(default_factory=dict)
    mask_sha256: str = ""

    @property
    def global_sparsity(self) -> float:
        return weighted_sparsity(self.layer_sparsity, self.layer_size)

    def sparsity_by(self, group_of_layer: dict[str, str]) -> dict[str, float]:
        """Achieved sparsity per group (e.g. per sub-model), weighted by layer size."""
        return sparsity_by_group(self.layer_sparsity, self.layer_size, group_of_layer)


@torch.no_grad()
def prune_sequential(model: nn.Module, adapter: Adapter, pruner, layer_sparsity: dict[str, float],
                     batches: list[Batch], device: torch.device, nm: tuple[int, int] | None = None,
                     comparison: dict[str, str] | None = None, refiner=None,
                     on_block_pruned: Callable[[str, nn.Module], None] | None = None) -> PruneReport:
    """Prune in place every layer that `layer_sparsity` names; stacks it does not name at all
    (a sub-model kept dense) are left untouched. `comparison` maps a sub-model to the group
    its scores are compared within ("row", the default, or "matrix"). `refiner` (DSnoT,
    catalog.REFINERS) swaps each layer's mask after its pruner, at the same sparsity.
    `on_block_pruned(name, block)` is called with each block once it is pruned, while it is
    still on the device (pruning/checkpoint.py writes it out). Returns the achieved sparsities."""
    if on_block_pruned is None and offload_mode(adapter.blocks(model)) == "disk":
        # a disk-offloaded block is dropped once the walk is past it and read again from the
        # source checkpoint when next reached: unwritten, its pruned weights would be lost and
        # the model would silently stay dense (and a later stack calibrate on the dense one)
        raise ValueError("pruning a model loaded with offload: disk needs somewhere to write each pruned block: pass "
                         "on_block_pruned=PrunedCheckpoint(model, adapter, source, out).write_block "
                         "(ecoflap/pruning/checkpoint.py), or load the model with offload: cpu or none")
    submodels = {stack.submodel for stack in adapter.stacks(model)}
    if set(comparison or {}) - submodels:  # a group for a tower this model lacks would set nothing
        raise ValueError(f"comparison names {', '.join(sorted(set(comparison) - submodels))}, not a sub-model of this "
                         f"{adapter.family} model (allowed: {', '.join(sorted(submodels))})")
    report = PruneReport()
    mask_hash = hashlib.sha256()
    for stack in adapter.stacks(model):
        prefixes = tuple(f"{stack.path}.{j}." for j in range(len(adapter.stack_blocks(model, stack))))
        if not any(k.startswith(prefixes) for k in layer_sparsity):
            log.info("stack %s (%s): not in the allocation, kept dense", stack.name, stack.path)
            continue
        group = (comparison or {}).get(stack.submodel, "row")
        for step in walk_stack(model, adapter, stack, batches, device, f"pruning {stack.name} blocks",
                               capture=pruner.needs_activations or refiner is not None):
            _prune_block(step, adapter, pruner, layer_sparsity, nm, report, mask_hash, group, refiner)
            if on_block_pruned is not None:
                on_block_pruned(step.name, step.block)
    if not report.layer_size:
        raise KeyError("the allocation names no layer of this model; was it made for another model?")
    report.mask_sha256 = mask_hash.hexdigest()
    log.info("pruned %d layers; global sparsity %.4f", len(report.layer_size), report.global_sparsity)
    return report


def _prune_block(step: BlockStep, adapter: Adapter, pruner, layer_sparsity: dict[str, float],
                 nm: tuple[int, int] | None, report: PruneReport, mask_hash, group: str = "row", refiner=None) -> None:
    layers = adapter.prunable_layers(step.block)
    missing = [f"{step.name}.{n}" for n in layers if f"{step.name}.{n}" not in layer_sparsity]
    if missing:
        raise KeyError(f"allocation has no sparsity for {missing[:3]}...; was it made for another model?")
    ratios = [layer_sparsity[f"{step.name}.{n}"] for n in layers]
    log.info("%s: %d layers at sparsity %.3f-%.3f", step.name, len(layers), min(ratios), max(ratios))
    stats = {name: pruner.init_stats(layer) for name, layer in layers.items()}
    refined = {name: refiner.init_stats(layer) for name, layer in layers.items()
               if refiner is not None and refiner.applies_to(name)}

    def accumulate(name: str, x: torch.Tensor) -> None:
        pruner.add_batch(stats[name], x)
        if name in refined:
            refiner.add_batch(refined[name], x)

    if pruner.needs_activations or refined:  # accumulate
        seen = feed_layers(step, layers, accumulate)
        unseen = [n for n, c in seen.items() if c == 0]
        if unseen:
            raise RuntimeError(f"{step.name}: layers {unseen} received no calibration activations (the calibration "
                               "forward never reaches them); their masks would be arbitrary. Fix the adapter's "
                               "calibration batch, or prune this model with magnitude")
    for name, layer in layers.items():  # sparsify
        full = f"{step.name}.{name}"
        dense = layer.weight.detach().clone() if name in refined else None
        mask = pruner.prune(layer, stats[name], layer_sparsity[full], nm, group)
        if name in refined:  # refine: swap weights at the same sparsity
            mask = refiner.refine(layer, dense, mask, refined[name], nm)
        check_finite(layer.weight, f"{full} after pruning",
                     "the calibration statistics overflowed; use float32 or bfloat16 instead of float16")
        report.layer_size[full] = mask.numel()
        report.layer_sparsity[full] = (layer.weight == 0).sum().item() / mask.numel()
        mask_hash.update(full.encode())
        mask_hash.update(mask.cpu().numpy().tobytes())
