"""The sequential layer-wise engine. Stack by stack in data-flow order (a language model
has one; BLIP-2 has vision, Q-Former and language stacks), block by block: collect the
calibration statistics of the block's layers on the outputs of the already pruned blocks
before it, prune each layer at its allocated ratio, then recompute the block's outputs for
the next block. A stack's inputs are captured by running the model, so the language model
of a vision-language model is calibrated on what the already pruned vision side produces."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.base import Adapter, Batch
from ecoflap.models.offload import resident
from ecoflap.pruning.capture import BlockInput, capture_stack_inputs, run_block
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
                     comparison: dict[str, str] | None = None) -> PruneReport:
    """Prune in place every layer that `layer_sparsity` names; stacks it does not name at all
    (a sub-model kept dense) are left untouched. `comparison` maps a sub-model to the group
    its scores are compared within ("row", the default, or "matrix"). Returns the achieved
    sparsities."""
    report = PruneReport()
    mask_hash = hashlib.sha256()
    for stack in adapter.stacks(model):
        blocks = adapter.stack_blocks(model, stack)
        names = [f"{stack.path}.{j}" for j in range(len(blocks))]
        if not any(k.startswith(tuple(n + "." for n in names)) for k in layer_sparsity):
            log.info("stack %s (%s): not in the allocation, kept dense", stack.name, stack.path)
            continue
        inputs = capture_stack_inputs(model, adapter, stack, batches, device) if pruner.needs_activations else []
        hidden = [per_block[0].hidden for per_block in inputs]
        for j, block in enumerate(tqdm(blocks, desc=f"pruning {stack.name} blocks", unit="block")):
            block_inputs = [per_block[j].with_hidden(h) for per_block, h in zip(inputs, hidden)]
            group = (comparison or {}).get(stack.submodel, "row")
            with resident(block):  # with offload: cpu, the block visits the device for all three steps
                _prune_block(block, names[j], adapter, pruner, layer_sparsity, block_inputs, nm, report, mask_hash,
                             group)
                if pruner.needs_activations and j + 1 < len(blocks):
                    hidden = [run_block(block, inp) for inp in block_inputs]
                    check_finite(hidden[0], f"{names[j]} outputs", "lower sparsity or use a wider dtype")
    if not report.layer_size:
        raise KeyError("the allocation names no layer of this model; was it made for another model?")
    report.mask_sha256 = mask_hash.hexdigest()
    log.info("pruned %d layers; global sparsity %.4f", len(report.layer_size), report.global_sparsity)
    return report


def _prune_block(block: nn.Module, prefix: str, adapter: Adapter, pruner, layer_sparsity: dict[str, float],
                 inputs: list[BlockInput], nm: tuple[int, int] | None, report: PruneReport, mask_hash,
                 group: str = "row") -> None:
    layers = adapter.prunable_layers(block)
    missing = [f"{prefix}.{n}" for n in layers if f"{prefix}.{n}" not in layer_sparsity]
    if missing:
        raise KeyError(f"allocation has no sparsity for {missing[:3]}...; was it made for another model?")
    ratios = [layer_sparsity[f"{prefix}.{n}"] for n in layers]
    log.info("%s: %d layers at sparsity %.3f-%.3f", prefix, len(layers), min(ratios), max(ratios))
    stats = {name: pruner.init_stats(layer) for name, layer in layers.items()}
    seen = {name: 0 for name in layers}
    running: list[BlockInput] = []  # the input being run, so hooks can drop its padding
    if pruner.needs_activations:
        def record(name: str):
            def hook(_m, args, _out):
                seen[name] += 1
                pruner.add_batch(stats[name], running[-1].real_positions(args[0]))
            return hook

        hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
        try:
            for inp in inputs:
                running.append(inp)
                run_block(block, inp)
        finally:
            for h in hooks:
                h.remove()
        unseen = [n for n, c in seen.items() if c == 0]
        if unseen:
            raise RuntimeError(f"{prefix}: layers {unseen} received no calibration activations (the calibration "
                               "forward never reaches them); their masks would be arbitrary. Fix the adapter's "
                               "calibration batch, or prune this model with magnitude")
    for name, layer in layers.items():
        full = f"{prefix}.{name}"
        mask = pruner.prune(layer, stats[name], layer_sparsity[full], nm, group)
        check_finite(layer.weight, f"{full} after pruning",
                     "the calibration statistics overflowed; use float32 or bfloat16 instead of float16")
        report.layer_size[full] = mask.numel()
        report.layer_sparsity[full] = (layer.weight == 0).sum().item() / mask.numel()
        mask_hash.update(full.encode())
        mask_hash.update(mask.cpu().numpy().tobytes())
