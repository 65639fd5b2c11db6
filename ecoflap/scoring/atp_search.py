"""ATP's search (Huang et al., ICML 2025; wzhuang-xmu/ATP): for each target sparsity, prune
the model with sparsity rising linearly with depth (allocation `atp`) for every step of a
grid, measure the pruned model, restore the dense weights, and keep the step that measured
best. The scores this "scorer" returns are only each block's depth within its stack; what
it chose (one step per target) goes into the scores file's record, where the `atp`
allocation reads it.

Their `search.sh`: steps 0.002, 0.004, ... (step 0.002, zero excluded) up to the largest
legal one, one full prune-and-evaluate per step, pruned with the method's pruner (Wanda or
SparseGPT), the objective being WikiText-2 *test* perplexity, the number they report.
Here the objective is the mean loss on the calibration windows the scorer is given (the
same windows the pruner sees), so the search never reads the evaluation set; the grid and
the pruner are theirs by default. Each run prunes in place and puts the dense weights
back, so the search holds one copy of the prunable weights in host memory besides the model.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.allocation.allocators import atp_max_step
from ecoflap.allocation.plan import plan_allocation
from ecoflap.models.base import Adapter, Batch, batch_to, model_layout
from ecoflap.models.offload import offload_mode
from ecoflap.pruning.engine import prune_sequential
from ecoflap.pruning.methods import make_pruner

log = logging.getLogger(__name__)


def block_depths(model: nn.Module, adapter: Adapter) -> dict[str, float]:
    """Each block's index within its stack, minus the stack's middle ((L - 1) / 2), plus the
    largest such middle so none is negative (scores are >= 0): block 0 nearest the
    embeddings is the shallowest. Centred per stack, so that every stack of a vision-language
    model gets the target on average (the allocation subtracts the mean depth)."""
    lengths = {stack.path: len(adapter.stack_blocks(model, stack)) for stack in adapter.stacks(model)}
    shift = max((n - 1) / 2 for n in lengths.values())
    return {f"{path}.{j}": j - (n - 1) / 2 + shift for path, n in lengths.items() for j in range(n)}


def step_grid(step: float, max_step: float) -> list[float]:
    """step, 2 step, ... below max_step. Their `>` check lets a step equal to the bound pass
    (a block at exactly 0 or 100 %); here it is left out, as no block may be pruned whole."""
    return [round(k * step, 12) for k in range(1, int(max_step / step + 1)) if k * step < max_step - 1e-12]


@torch.no_grad()
def calibration_loss(model: nn.Module, adapter: Adapter, batches: list[Batch], device: torch.device) -> float:
    """Mean loss over the batches, each weighted by its number of windows."""
    total, count = 0.0, 0
    for batch in batches:
        n = len(next(iter(batch.values())))
        total += adapter.loss(model, batch_to(batch, device)).item() * n
        count += n
    return total / count


@torch.no_grad()
def atp_search_scores(model: nn.Module, adapter: Adapter, batches: list[Batch], device: torch.device,
                      targets: list[float], step: float = 0.002, pruner: str = "wanda"
                      ) -> tuple[dict[str, float], dict]:
    """Block depths, and a record of the grid search: for each target its grid, each step's
    calibration loss, the chosen step, the number of prune-and-measure runs and their time."""
    if not targets:
        raise ValueError("atp_search needs the target sparsities (scorer option targets; the workflow passes "
                         "the config's sparsities)")
    if offload_mode(adapter.blocks(model)) == "disk":
        raise ValueError("atp_search keeps a copy of every dense layer to restore it after each run, which offload: "
                         "disk exists to avoid; score it with offload: cpu (host memory holds the model) or none")
    model.eval()
    depths = block_depths(model, adapter)
    laid_out = {"layout": model_layout(model, adapter), "submodel_of_block": adapter.submodel_of_block(model)}
    sizes = {b: sum(layers.values()) for b, layers in laid_out["layout"].items()}
    # the dense weights of every prunable layer, put back after each run
    layers = [layer for block in adapter.blocks(model) for layer in adapter.prunable_layers(block).values()]
    dense = [layer.weight.detach().to("cpu", copy=True) for layer in layers]
    prune_with = make_pruner(pruner)
    scored = {"scores": depths, "granularity": "block"}
    t_start = time.perf_counter()
    dense_loss = calibration_loss(model, adapter, batches, device)
    log.info("atp search: dense calibration loss %.4f", dense_loss)
    record: dict = {"objective": "mean calibration loss", "pruner": pruner, "grid_step": step,
                    "dense_loss": dense_loss, "targets": {}, "chosen": {}}
    for target in targets:
        grid = step_grid(step, atp_max_step(depths, sizes, target))
        if not grid:
            raise ValueError(f"atp_search: no step of {step} is legal at target {target}; lower the scorer's step")
        losses = {}
        t0 = time.perf_counter()
        for beta in tqdm(grid, desc=f"atp search at {target:g}", unit="step"):
            plan = plan_allocation(laid_out, scored, {"allocation": "atp", "step": beta}, target)
            prune_sequential(model, adapter, prune_with, plan["layer_sparsity"], batches, device)
            losses[beta] = calibration_loss(model, adapter, batches, device)
            for layer, w in zip(layers, dense):
                layer.weight.copy_(w)
            log.info("atp search at %g: step %.4f -> loss %.4f", target, beta, losses[beta])
        finite = {b: v for b, v in losses.items() if math.isfinite(v)}
        if not finite:
            raise FloatingPointError(f"atp_search at {target:g}: every step's calibration loss is non-finite "
                                     f"({losses}); score in float32 (dtype: float32)")
        # the first of equals, as their strict `<`; a NaN loss (a run that overflowed) never wins: min()
        # kept a NaN in first place, since nothing compares below it
        best = min(finite, key=finite.get)
        label = f"{target:g}"
        record["targets"][label] = {"grid": [{"step": b, "loss": v} for b, v in losses.items()], "chosen_step": best,
                                    "runs": len(grid), "seconds": time.perf_counter() - t0}
        record["chosen"][label] = {"step": best}
        log.info("atp search at %g: step %.4f chosen of %d (loss %.4f)", target, best, len(grid), losses[best])
    record["runs"] = sum(t["runs"] for t in record["targets"].values())
    record["seconds"] = time.perf_counter() - t_start
    return depths, record
