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

from ecoflap.models.base import Adapter, Batch, batch_to
from ecoflap.models.offload import keep_on_device, release
from ecoflap.scoring.units import direction, first_order_term, gradients_only_for, scoring_units
from ecoflap.utils.runtime import check_finite

REDUCTIONS = ("l2", "projection", "abs_g", "abs_wg")


@contextmanager
def recomputed_blocks(blocks: list[nn.Module], on_call=None) -> Iterator[None]:
    """Run each block under non-reentrant activation checkpointing (keyword arguments and
    all), restoring the forward it had afterwards. `on_call(j, hidden)` sees block j's input
    hidden states in the forward pass (the recomputation calls the plain forward only)."""
    before = [block.__dict__.get("forward") for block in blocks]  # offload's onloading forward, if any
    for j, block in enumerate(blocks):
        def forward(*args, _plain=block.forward, _j=j, **kwargs):
            if on_call is not None:
                on_call(_j, args[0] if args else kwargs.get("hidden_states"))
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
        block.forward = forward
    try:
        yield
    finally:
        for block, previous in zip(blocks, before):
            if previous is None:
                del block.forward  # the instance attribute; the class's forward shows again
            else:
                block.forward = previous


class BackwardProgress:
    """Tells offload when a block's part of the backward pass is over, so that the block can
    leave the device: every scored weight's gradient has been accumulated, and, when the
    block's input needs a gradient, that gradient is complete too (its last steps, such as a
    pre-norm's backward, use the block's own unscored weights). Autograd checks that each
    gradient lands on its parameter's device, so releasing a block any earlier fails."""

    def __init__(self, blocks: list[nn.Module], weights_per_block: list[int]):
        self.blocks = blocks
        self.weights_per_block = weights_per_block
        self.new_batch()

    def new_batch(self) -> None:
        self.pending = list(self.weights_per_block)
        self.input_pending = [False] * len(self.blocks)

    def saw_input(self, j: int, hidden: torch.Tensor | None) -> None:
        if hidden is not None and hidden.requires_grad:
            self.input_pending[j] = True
            hidden.register_hook(lambda _grad, j=j: self._input_done(j))

    def weight_done(self, j: int) -> None:
        self.pending[j] -= 1
        self._maybe_release(j)

    def _input_done(self, j: int) -> None:
        self.input_pending[j] = False
        self._maybe_release(j)

    def _maybe_release(self, j: int) -> None:
        if self.pending[j] == 0 and not self.input_pending[j]:
            release(self.blocks[j])


def checkpointed_gradient_scores(model: nn.Module, adapter: Adapter, batches: list[Batch],
                                 device: torch.device, granularity: str = "block", reduce: str = "abs_wg",
                                 seed: int = 0) -> dict[str, float]:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    units = scoring_units(model, adapter, granularity)
    where = {id(w): (ui, ti) for ui, u in enumerate(units) for ti, w in enumerate(u.weights)}
    scores = {u.name: 0.0 for u in units}
    per_batch = [0.0] * len(units)
    batch_index = 0
    blocks = adapter.blocks(model)
    block_of_unit = [u.block_index for u in units]
    weights_per_block = [0] * len(blocks)
    for u in units:
        weights_per_block[u.block_index] += len(u.weights)
    progress = BackwardProgress(blocks, weights_per_block)  # when offload may take a block back

    def reduce_now(w: torch.Tensor) -> None:
        ui, ti = where[id(w)]
        g = w.grad.float()
        if reduce == "l2":
            per_batch[ui] += g.pow(2).sum().item()
        elif reduce == "projection":
            per_batch[ui] += (direction(w.shape, seed, batch_index, ui, ti, device) * g).sum().item()
        else:
            per_batch[ui] += first_order_term(g, w, reduce)
        w.grad = None
        progress.weight_done(block_of_unit[ui])

    with gradients_only_for(model, units):
        handles = [w.register_post_accumulate_grad_hook(reduce_now) for u in units for w in u.weights]
        try:
            with recomputed_blocks(blocks, on_call=progress.saw_input):
                for batch_index, batch in enumerate(tqdm(batches, desc=f"checkpointed gradients ({reduce})",
                                                         unit="batch")):
                    per_batch[:] = [0.0] * len(units)
                    progress.new_batch()
                    loss = adapter.loss(model, batch_to(batch, device))
                    check_finite(loss.detach(), f"calibration loss (batch {batch_index})", "use float32 or bfloat16")
                    with keep_on_device(blocks):  # a recomputed block stays until `progress` releases it
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
    return scores
