"""The sequential layer-wise engine. Block by block: collect the calibration statistics
of the block's layers on the outputs of the already pruned blocks before it, prune each
layer at its allocated ratio, then recompute the block's outputs for the next block."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.adapters import DecoderAdapter
from ecoflap.pruning.capture import BlockInput, capture_block_inputs, run_block
from ecoflap.utils.runtime import check_finite

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    layer_size: dict[str, int] = field(default_factory=dict)
    mask_sha256: str = ""

    @property
    def global_sparsity(self) -> float:
        total = sum(self.layer_size.values())
        return sum(self.layer_sparsity[k] * n for k, n in self.layer_size.items()) / total


@torch.no_grad()
def prune_sequential(model: nn.Module, adapter: DecoderAdapter, pruner, layer_sparsity: dict[str, float],
                     batches: list[torch.Tensor], device: torch.device, nm: tuple[int, int] | None = None) -> PruneReport:
    """Prune every prunable layer of `model` in place; returns the achieved sparsities."""
    report = PruneReport()
    mask_hash = hashlib.sha256()
    blocks = adapter.blocks(model)
    inputs: list[BlockInput] = capture_block_inputs(model, adapter, batches, device) if pruner.needs_activations else []
    for b, block in enumerate(tqdm(blocks, desc="pruning blocks", unit="block")):
        prefix = adapter.block_name(b)
        layers = adapter.prunable_layers(block)
        missing = [f"{prefix}.{n}" for n in layers if f"{prefix}.{n}" not in layer_sparsity]
        if missing:
            raise KeyError(f"allocation has no sparsity for {missing[:3]}...; was it made for another model?")
        ratios = [layer_sparsity[f"{prefix}.{n}"] for n in layers]
        log.info("block %d/%d (%s): %d layers at sparsity %.3f-%.3f", b + 1, len(blocks), prefix, len(layers),
                 min(ratios), max(ratios))
        stats = {name: pruner.init_stats(layer) for name, layer in layers.items()}
        if pruner.needs_activations:
            hooks = [layer.register_forward_hook(
                lambda _m, args, _out, name=name: pruner.add_batch(stats[name], args[0]))
                for name, layer in layers.items()]
            try:
                for inp in inputs:
                    run_block(block, inp)
            finally:
                for h in hooks:
                    h.remove()
        for name, layer in layers.items():
            full = f"{prefix}.{name}"
            log.debug("block %d layer %s: %s at %.3f", b, name, type(pruner).__name__, layer_sparsity[full])
            mask = pruner.prune(layer, stats[name], layer_sparsity[full], nm)
            check_finite(layer.weight, f"block {b} layer {name} after pruning",
                         "the calibration statistics overflowed; use float32 or bfloat16 instead of float16")
            report.layer_size[full] = mask.numel()
            report.layer_sparsity[full] = (layer.weight == 0).sum().item() / mask.numel()
            mask_hash.update(full.encode())
            mask_hash.update(mask.cpu().numpy().tobytes())
        del stats
        if pruner.needs_activations and b + 1 < len(blocks):
            inputs = [inp.with_hidden(run_block(block, inp)) for inp in inputs]
            check_finite(inputs[0].hidden, f"block {b} outputs", "lower sparsity or use a wider dtype")
    report.mask_sha256 = mask_hash.hexdigest()
    log.info("pruned %d layers; global sparsity %.4f", len(report.layer_size), report.global_sparsity)
    return report
