"""Exact gradients at inference-level memory: one forward pass without autograd stores
each block's input; the backward pass then walks the blocks from last to first,
recomputing one block with autograd, pushing the upstream gradient through it, and
reducing its weight gradients to the unit scores before moving on. At no time are more
than one block's activations or weight gradients alive.

Reductions (per unit, summed over batches):
  * "l2":         ||g||_2, the quantity the zeroth-order score estimates (E|z.g| =
                  sqrt(2/pi) ||g|| for z ~ N(0, I)) without its sampling noise;
  * "projection": |z.g| with the zeroth-order scorer's own directions: the paper's
                  estimator in the limit eps -> 0 (used to check the two agree);
  * "abs_g", "abs_wg": the first-order variants, at inference memory.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.adapters import DecoderAdapter
from ecoflap.pruning.capture import inputs_of_every_block, run_block
from ecoflap.scoring.units import first_order_term, scoring_units
from ecoflap.scoring.zeroth_order import _direction
from ecoflap.utils.runtime import check_finite

REDUCTIONS = ("l2", "projection", "abs_g", "abs_wg")


def checkpointed_gradient_scores(model: nn.Module, adapter: DecoderAdapter, batches: list[torch.Tensor],
                                 device: torch.device, granularity: str = "block", reduce: str = "l2",
                                 seed: int = 0) -> dict[str, float]:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    units = scoring_units(model, adapter, granularity)
    by_block: dict[int, list[tuple[int, object]]] = {}
    for ui, unit in enumerate(units):
        by_block.setdefault(unit.block_index, []).append((ui, unit))
    blocks = adapter.blocks(model)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    scores = {u.name: 0.0 for u in units}
    try:
        for bi, ids in enumerate(tqdm(batches, desc=f"checkpointed gradients ({reduce})", unit="batch")):
            inputs = inputs_of_every_block(model, adapter, ids, device)
            with torch.no_grad():
                last = run_block(blocks[-1], inputs[-1])
            last.requires_grad_(True)
            with torch.enable_grad():
                loss = adapter.loss_from_hidden(model, last, inputs[0].input_ids)
            check_finite(loss.detach(), f"calibration loss (batch {bi})", "use float32 or bfloat16")
            (upstream,) = torch.autograd.grad(loss, last)
            del last, loss
            for b in range(len(blocks) - 1, -1, -1):
                weights = [w for _, u in by_block[b] for w in u.weights]
                for w in weights:
                    w.requires_grad_(True)
                h = inputs[b].hidden.detach().requires_grad_(b > 0)
                with torch.enable_grad():
                    out = run_block(blocks[b], inputs[b].with_hidden(h))
                    grads = torch.autograd.grad(out, ([h] if b > 0 else []) + weights, upstream)
                for w in weights:
                    w.requires_grad_(False)
                upstream, wgrads = (grads[0], grads[1:]) if b > 0 else (None, grads)
                _reduce_into(scores, by_block[b], wgrads, reduce, seed, bi, device)
                inputs[b] = None  # free the stored input as soon as its block is done
                del out, grads, wgrads
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return scores


def _reduce_into(scores: dict[str, float], units: list, grads: tuple[torch.Tensor, ...], reduce: str, seed: int,
                 batch: int, device: torch.device) -> None:
    it = iter(grads)
    for ui, unit in units:
        total = 0.0
        for ti, w in enumerate(unit.weights):
            g = next(it).float()
            if reduce == "l2":
                total += g.pow(2).sum().item()
            elif reduce == "projection":
                total += (_direction(w.shape, seed, batch, ui, ti, device) * g).sum().item()
            else:
                total += first_order_term(g, w, reduce)
        value = total ** 0.5 if reduce == "l2" else abs(total)
        check_finite(torch.tensor(value), f"gradient score of {unit.name} (batch {batch})", "use float32")
        scores[unit.name] += value
