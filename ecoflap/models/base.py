"""One adapter per model family: which modules are the prunable blocks, grouped in stacks
that data flows through in order, and how a calibration batch becomes a loss. Scoring,
allocation and pruning only talk to this interface; they never look at model names.

A *stack* is a sequence of blocks that pass hidden states from one to the next (a vision
encoder, a Q-Former, a language model's decoder). A decoder-only LM has one stack; BLIP-2
with FlanT5 has four (vision, Q-Former, T5 encoder, T5 decoder). Each stack belongs to a
*sub-model* ("vision", "qformer", "language"), the unit of the per-sub-model budget.

This module is the interface; each family's adapter lives in `models/families/`, and
`models/registry.py` says which adapter a loaded model gets. Calibration batches are dicts
of tensors, passed to the model as keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecoflap.catalog import FAMILIES, Family

Batch = dict[str, torch.Tensor]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 for bf16/fp16 models; float64 models (tests) keep their precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def get_module(obj: object, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def batch_to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class Stack:
    """Blocks at `path` (a ModuleList) that hand hidden states to each other.

    per_block_inputs: the model passes each block different extra arguments (T5 hands the
    relative position bias computed by block 0 to the later blocks), so the capture must
    record every block's arguments instead of reusing block 0's.
    calls: how many times one forward pass runs the stack (BLIP-2's retrieval model runs
    its Q-Former once on the image queries and once on the text); each run is calibration
    data of its own.
    mask_key: the batch entry marking the stack's real (non-padding) positions, so padding
    does not enter the pruners' activation statistics ("labels": those not -100).
    cross_mask_key: the batch entry marking the real positions of the states the stack's
    cross-attention reads (a T5 decoder's: the encoder's attention_mask), so the encoder's
    padding does not enter the statistics of the cross-attention's k and v either.
    leading_real: how many always-real positions the stack's states hold in front of those its
    mask_key entry marks (InstructBLIP's Q-Former: its learned queries, then the instruction).
    Layers over all the positions take the mask with these in front; layers over the marked
    positions alone (the Q-Former's text FFN) take the mask as it is.
    injects_between_blocks: the model adds to the hidden states between blocks, outside any
    block (Qwen3-VL's DeepStack adds vision features to the image positions after each of the
    first language blocks). The capture records each block's output besides its input, and the
    walk adds the difference, the injection, to the (pruned) block's outputs before the next
    block sees them. Needs per_block_inputs.
    """

    name: str
    path: str
    submodel: str
    per_block_inputs: bool = False
    calls: int = 1
    mask_key: str | None = None
    cross_mask_key: str | None = None
    injects_between_blocks: bool = False
    leading_real: int = 0

    def __post_init__(self) -> None:
        if self.injects_between_blocks and not self.per_block_inputs:
            raise ValueError(f"stack {self.name}: injects_between_blocks needs per_block_inputs (the injection is "
                             "what separates one block's output from the next block's captured input)")


class Adapter:
    """Base: subclasses set `family` (a key of catalog.FAMILIES, which declares what the
    family can do) and implement `stacks` and `loss`."""

    family: str

    @property
    def capabilities(self) -> Family:
        return FAMILIES[self.family]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.capabilities.tasks

    def stacks(self, model: nn.Module) -> list[Stack]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The calibration loss from a full forward pass."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch) -> None:
        """Run the model on a calibration batch (block hooks record what flows through)."""
        self.loss(model, batch)

    # -- derived from stacks ----------------------------------------------------------------
    def stack_blocks(self, model: nn.Module, stack: Stack) -> list[nn.Module]:
        return list(get_module(model, stack.path))

    def named_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block of every stack, in data-flow order, by its module path."""
        return [(f"{s.path}.{j}", block) for s in self.stacks(model)
                for j, block in enumerate(self.stack_blocks(model, s))]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [block for _, block in self.named_blocks(model)]

    def submodel_of_block(self, model: nn.Module) -> dict[str, str]:
        return {f"{s.path}.{j}": s.submodel for s in self.stacks(model)
                for j in range(len(self.stack_blocks(model, s)))}

    def prunable_layers(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Every Linear inside a block, by its name relative to the block (as Wanda does)."""
        return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def model_layout(model: nn.Module, adapter: Adapter) -> dict[str, dict[str, int]]:
    """{block name: {full layer name: weight count}} for every prunable layer, in model order."""
    return {prefix: {f"{prefix}.{n}": layer.weight.numel() for n, layer in adapter.prunable_layers(block).items()}
            for prefix, block in adapter.named_blocks(model)}
