"""Exact gradients at inference-level memory, for any model the adapters describe: every
block's forward is wrapped in activation checkpointing, so the forward pass keeps only each
block's inputs, and the backward pass recomputes one block at a time. Each scored weight's
gradient is reduced to its unit's score the moment it is accumulated, and freed: no more
than one block's activations and weight gradients are alive at once. Gradients flow across
stacks (language model -> projection -> Q-Former -> vision encoder) as in a normal backward.

Reductions (per unit and batch, summed over batches):
  * "l2":         ||g||_2, the quantity the zeroth-order score estimates (E|z.g| =
                  sqrt(2/pi) ||g|| for z ~ N(0, I)) without its sampling noise;
  * "projection": |z.g| with the zeroth-order scorer's own directions: the paper's
                  estimator in the limit eps -> 0 (used to check the two agree);
  * "abs_g", "abs_wg": the first-order variants, at inference memory.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ecoflap.models.adapters import Adapter, Batch, batch_to
from ecoflap.scoring.units import first_order_term, scoring_units
from ecoflap.scoring.zeroth_order import _direction
from ecoflap.utils.runtime import check_finite

REDUCTIONS = ("l2", "projection", "abs_g", "abs_wg")


@contextmanager
def recomputed_blocks(blocks: list[nn.Module]) -> Iterator[None]:
    """Run each block under non-reentrant activation checkpointing (keyword arguments and
    all), restoring the plain forward afterwards."""
    for block in blocks:
        def forward(*args, _plain=block.forward, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
        block.forward = forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute; the class's forward shows again


def checkpointed_gradient_scores(model: nn.Module, adapter: Adapter, batches: list[Batch],
                                 device: torch.device, granularity: str = "block", reduce: str = "l2",
                                 seed: int = 0) -> dict[str, float]:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    units = scoring_units(model, adapter, granularity)
    where = {id(w): (ui, ti) for ui, u in enumerate(units) for ti, w in enumerate(u.weights)}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in where)
    scores = {u.name: 0.0 for u in units}
    per_batch = [0.0] * len(units)
    batch_index = 0

    def reduce_now(w: torch.Tensor) -> None:
        ui, ti = where[id(w)]
        g = w.grad.float()
        if reduce == "l2":
            per_batch[ui] += g.pow(2).sum().item()
        elif reduce == "projection":
            per_batch[ui] += (_direction(w.shape, seed, batch_index, ui, ti, device) * g).sum().item()
        else:
            per_batch[ui] += first_order_term(g, w, reduce)
        w.grad = None

    handles = [w.register_post_accumulate_grad_hook(reduce_now) for u in units for w in u.weights]
    try:
        with recomputed_blocks(adapter.blocks(model)):
            for batch_index, batch in enumerate(tqdm(batches, desc=f"checkpointed gradients ({reduce})",
                                                     unit="batch")):
                per_batch[:] = [0.0] * len(units)
                loss = adapter.loss(model, batch_to(batch, device))
                check_finite(loss.detach(), f"calibration loss (batch {batch_index})", "use float32 or bfloat16")
                loss.backward()
                del loss
                for ui, unit in enumerate(units):
                    value = per_batch[ui] ** 0.5 if reduce == "l2" else abs(per_batch[ui])
                    check_finite(torch.tensor(value), f"gradient score of {unit.name} (batch {batch_index})",
                                 "use float32")
                    scores[unit.name] += value
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return scores
