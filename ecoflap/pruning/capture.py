"""Calibration capture: the inputs of the first block, and running one block on them.

A forward pre-hook on block 0 records exactly what the model passes to its blocks
(hidden states plus keyword arguments such as the attention mask and rotary
embeddings) and stops the forward pass there, as Wanda's `Catcher` does, but without
knowing the model's signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecoflap.models.adapters import DecoderAdapter


@dataclass
class BlockInput:
    """One calibration batch as it enters a block."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    input_ids: torch.Tensor  # kept for the loss at the end of the model

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInput":
        return BlockInput(hidden, self.kwargs, self.input_ids)


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: DecoderAdapter, batches: list[torch.Tensor],
                         device: torch.device) -> list[BlockInput]:
    first = adapter.blocks(model)[0]
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    out = []
    try:
        for ids in batches:
            ids = ids.to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            args, kwargs = captured.pop()
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
            kwargs["use_cache"] = False
            out.append(BlockInput(hidden, kwargs, ids))
    finally:
        handle.remove()
    return out


@torch.no_grad()
def inputs_of_every_block(model: nn.Module, adapter: DecoderAdapter, ids: torch.Tensor,
                          device: torch.device) -> list[BlockInput]:
    """The clean input of each block for one batch, from one forward pass without autograd."""
    inputs = capture_block_inputs(model, adapter, [ids], device)
    for block in adapter.blocks(model)[:-1]:
        inputs.append(inputs[-1].with_hidden(run_block(block, inputs[-1])))
    return inputs


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_from(model: nn.Module, adapter: DecoderAdapter, start: int, inp: BlockInput) -> torch.Tensor:
    """Loss of the model computed from the inputs of block `start` onwards."""
    hidden = inp.hidden
    for block in adapter.blocks(model)[start:]:
        hidden = run_block(block, inp.with_hidden(hidden))
    return adapter.loss_from_hidden(model, hidden, inp.input_ids)
