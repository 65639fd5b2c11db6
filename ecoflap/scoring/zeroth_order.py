"""ECoFLaP's zeroth-order importance: for each calibration batch and unit, one random
direction z ~ N(0, I) over the unit's weights, the projected gradient
(L(W + eps z) - L(W - eps z)) / (2 eps) from two forward passes, |.| summed over batches.

Two knobs change the cost, not the estimator:
  * granularity "layer" perturbs one weight tensor at a time (the paper), "block" perturbs
    all of a block's tensors with one direction (30x fewer evaluations on a 30-block model);
  * reuse_block_inputs caches each block's clean inputs from one forward pass per batch,
    so a perturbed evaluation only re-runs the model from the perturbed block to the loss
    (the blocks before it see unperturbed weights, so their outputs are unchanged).
Directions are regenerated from (seed, batch, unit): nothing is stored, runs are repeatable.

Tried on paper and not kept: evaluating +eps and -eps in one doubled batch saves no
arithmetic (both halves still run every block after the perturbed one) and doubles the
activation memory; restoring weights by subtracting the direction again instead of from a
copy of the unit saves one unit's memory but leaves rounding residue in the weights, which
breaks bit-identical reruns. The way to make this stage cheap is not to estimate at all:
scoring/checkpointed.py computes the quantity this estimates (the gradient norm, or the
same projections) exactly, at the same inference-level memory; `python -m ecoflap
benchmark-scoring` measures the two side by side (README, "Scoring cost").
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.base import Adapter, Batch, batch_to
from ecoflap.models.offload import BlockHolder, resident
from ecoflap.blocks.capture import BlockInput, run_block
from ecoflap.blocks.walk import inputs_of_every_block
from ecoflap.scoring.units import direction, scoring_units
from ecoflap.utils.runtime import check_finite

log = logging.getLogger(__name__)


@torch.no_grad()
def zeroth_order_scores(model: nn.Module, adapter: Adapter, batches: list[Batch], device: torch.device,
                        eps: float = 1e-3, granularity: str = "block", reuse_block_inputs: bool = True,
                        seed: int = 0, perturb: str = "unit") -> dict[str, float]:
    """perturb "unit" draws one direction per scored unit; "tensor" with granularity "block"
    perturbs one weight tensor at a time and sums the |estimates| of a block's tensors, as the
    authors' BLIP-2 runs do (per-tensor MEZO scores, block-level allocation)."""
    if perturb not in ("unit", "tensor"):
        raise ValueError(f"perturb must be 'unit' or 'tensor', got {perturb!r}")
    _check_precision(model, adapter, eps)
    if perturb == "tensor" and granularity == "block":
        per_tensor = zeroth_order_scores(model, adapter, batches, device, eps, "layer", reuse_block_inputs, seed)
        blocks = [name for name, _ in adapter.named_blocks(model)]
        out = {b: 0.0 for b in blocks}
        for unit, value in per_tensor.items():
            out[next(b for b in blocks if unit.startswith(b + "."))] += value
        return out
    units = scoring_units(model, adapter, granularity)
    scores = {u.name: 0.0 for u in units}
    bar = tqdm(total=len(batches) * len(units), desc=f"zeroth-order scores ({granularity})", unit="unit")
    held = BlockHolder(adapter.blocks(model))
    for bi, batch in enumerate(batches):
        batch = batch_to(batch, device)
        if reuse_block_inputs:
            cached = inputs_of_every_block(model, adapter, batch, device, "reuse_block_inputs")

        for ui, unit in enumerate(units):
            held.hold(unit.block_index)  # offload: cpu moves the perturbed block to the device once per batch
            backup = [w.detach().clone() for w in unit.weights]
            dirs = [direction(w.shape, seed, bi, ui, ti, device) for ti, w in enumerate(unit.weights)]

            def perturb(sign: float) -> None:
                for w, b, z in zip(unit.weights, backup, dirs):
                    w.copy_(b).add_(z.to(w.dtype), alpha=sign * eps)

            if reuse_block_inputs:
                plus, minus = _plus_minus_from(model, adapter, unit.block_index, cached, perturb)
            else:
                perturb(1.0)
                plus = adapter.loss(model, batch).item()
                perturb(-1.0)
                minus = adapter.loss(model, batch).item()
            for w, b in zip(unit.weights, backup):
                w.copy_(b)
            grad = torch.tensor((plus - minus) / (2 * eps))
            check_finite(grad, f"zeroth-order score of {unit.name} (batch {bi})",
                         "lower scoring eps, or score in float32 (dtype: float32)")
            scores[unit.name] += abs(grad.item())
            bar.update()
        held.hold(None)
    bar.close()
    return scores


def _check_precision(model: nn.Module, adapter: Adapter, eps: float) -> None:
    """In bfloat16 (8 significant bits) W + eps z rounds back to W for a share of the weights that
    grows with |W| (4-10 % on the tiny LLaMA at eps 1e-3), yet the difference is divided by the
    nominal 2 eps: the scores came out 2-24 % off the exact |z . g|, differently per block, with no
    NaN to notice. float16 (11 bits) stayed within 2 %, float32 within 0.3 %."""
    if any(w.dtype == torch.bfloat16 for block in adapter.blocks(model)
           for w in (layer.weight for layer in adapter.prunable_layers(block).values())):
        raise ValueError(f"zeroth-order scores with eps {eps:g} need more precision than bfloat16 has (its steps "
                         "round away): load the model as float32 (dtype: auto does so for this scorer) or float16, "
                         "or use the checkpointed scorer (exact gradients, fine in bfloat16)")


def _plus_minus_from(model: nn.Module, adapter: Adapter, start: int, cached: list[BlockInput],
                     perturb) -> tuple[float, float]:
    """The losses at W + eps z and W - eps z from block `start`'s clean input: the perturbed
    block runs once per sign, then both hidden states go through each later block while it
    is on the device, so an offloaded block is brought there (or read from disk) once per
    pair, not twice. Each path is the same arithmetic as running the two passes one after
    the other, so the scores are identical."""
    blocks = adapter.blocks(model)
    first = cached[start]
    perturb(1.0)
    plus = run_block(blocks[start], first)
    perturb(-1.0)
    minus = run_block(blocks[start], first)
    for j in range(start + 1, len(blocks)):
        with resident(blocks[j]):
            plus = run_block(blocks[j], cached[j].with_hidden(plus))
            minus = run_block(blocks[j], cached[j].with_hidden(minus))
    if first.device is not None:  # activations: cpu
        plus, minus = plus.to(first.device), minus.to(first.device)
    return (adapter.loss_from_hidden(model, plus, first.batch).item(),
            adapter.loss_from_hidden(model, minus, first.batch).item())
