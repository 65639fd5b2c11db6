"""The one block-by-block loop that pruning, OWL's outlier ratios and the scorers' block-input
capture share: capture a stack's inputs, then for each block run it over every calibration
batch with forward hooks on its layers (what a method accumulates), let the caller act on
the block (prune it, or measure it), and propagate the block's outputs to the next block.

    for step in walk_stack(model, adapter, stack, batches, device, "pruning"):
        feed_layers(step, layers, on_input)   # accumulate: hooks see every layer input
        ...                                   # act: e.g. prune the layers in place
                                              # propagate: done by the walk, on the new weights
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.blocks.capture import BlockInput, StopForward, capture_stack_inputs, run_block, single_stack
from ecoflap.models.base import Adapter, Batch, Stack
from ecoflap.models.offload import HOST, park_activations, resident
from ecoflap.utils.runtime import check_finite


@dataclass
class BlockStep:
    """Block `index` of a stack and its inputs (one per calibration batch and stack run).
    A caller that already ran the block on these inputs with its final weights may set
    `outputs`, and the walk passes them on instead of running the block again."""

    index: int
    name: str  # module path, e.g. model.layers.3
    block: nn.Module
    inputs: list[BlockInput]
    last: bool
    outputs: list[torch.Tensor] | None = field(default=None)


@torch.no_grad()
def walk_stack(model: nn.Module, adapter: Adapter, stack: Stack, batches: list[Batch], device: torch.device,
               desc: str | None, capture: bool = True,
               hint: str = "lower sparsity or use a wider dtype") -> Iterator[BlockStep]:
    """Yield each block of `stack` in order with its inputs. The block stays on the device (with
    offload: cpu) while the caller works on it and while its outputs are computed, after the
    caller is done, as the next block's inputs. `capture=False` walks the blocks without data
    (magnitude pruning). `desc` None: no progress bar (a loop run once per batch). `hint`: what
    to do when a block's outputs are not finite."""
    inputs = capture_stack_inputs(model, adapter, stack, batches, device) if capture else []
    hidden = [per_block[0].hidden for per_block in inputs]
    for h in hidden:  # the stack's inputs (embeddings, a previous stack's states) as they enter block 0
        check_finite(h, f"{stack.path}.0 inputs", "the model's inputs overflowed; check the checkpoint, or use a "
                     "wider dtype")
    park = bool(inputs) and park_activations(model, hidden, device, stack.path)
    if park:  # activations: cpu. Host memory holds them; no reference to the device copies stays
        hidden = [h.to(HOST) for h in hidden]
        inputs = [[inp.with_hidden(None) for inp in per_block] for per_block in inputs]
        for per_block in inputs:
            for inp in per_block:
                if inp.injection is not None:
                    inp.injection = inp.injection.to(HOST)
    blocks = adapter.stack_blocks(model, stack)
    for j, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=desc is None)):
        step = BlockStep(j, f"{stack.path}.{j}", block,
                         [per_block[j].with_hidden(h, device if park else None) for per_block, h in zip(inputs, hidden)],
                         j + 1 == len(blocks))
        with resident(block):
            yield step
            if inputs and not step.last:
                hidden = step.outputs if step.outputs is not None else [run_block(block, inp) for inp in step.inputs]
                hidden = [inp.next_input(h) for inp, h in zip(step.inputs, hidden)]
                for h in hidden:  # every batch's: a NaN in any of them reaches the next block's statistics
                    check_finite(h, f"{step.name} outputs", hint)


def feed_layers(step: BlockStep, layers: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None],
                keep_outputs: bool = False) -> dict[str, int]:
    """Run the block over its inputs with a hook on each layer: `on_input(name, x)` gets every
    input of the layer, padding positions dropped. Returns how many inputs each layer saw;
    with `keep_outputs`, the block's outputs are kept as the step's outputs (its weights must
    not change afterwards).

    Without `keep_outputs` the block's outputs are thrown away (the walk recomputes them with
    the pruned weights), so once the first input has shown the order the layers run in, each
    later input stops as soon as the last layer has received its input: a LLaMA block skips
    its down_proj and residual, about a quarter of this pass. That holds only when every
    layer ran exactly once on the first input; a block that runs a layer twice, or skips
    one (a mixture of experts), always runs to the end."""
    seen = {name: 0 for name in layers}
    running: list[BlockInput] = []  # the input being run, so a hook can drop its padding
    order: list[str] = []  # the layers in the order they ran on the first input
    calls_now: dict[str, int] = {}  # per layer, calls on the input being run
    stop_after: list[str] = []  # the last layer to run, once the first input allows stopping

    def hook_for(name: str):
        def hook(_module, args):
            seen[name] += 1
            calls_now[name] = calls_now.get(name, 0) + 1
            if len(running) == 1:
                order.append(name)
            on_input(name, running[-1].real_positions(args[0]))
            if stop_after and name == stop_after[0] and all(calls_now.get(n) == 1 for n in layers):
                raise StopForward  # every layer has its input; the block's output is not needed
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    outputs = []
    try:
        for inp in step.inputs:
            running.append(inp)
            calls_now.clear()
            try:
                out = run_block(step.block, inp)
            except StopForward:
                continue
            if keep_outputs:
                outputs.append(out)
            elif len(running) == 1 and sorted(order) == sorted(layers):  # each layer ran once
                stop_after.append(order[-1])
    finally:
        for h in handles:
            h.remove()
    if keep_outputs:
        step.outputs = outputs
    return seen


def inputs_of_every_block(model: nn.Module, adapter: Adapter, batch: Batch, device: torch.device,
                          what: str = "this scorer") -> list[BlockInput]:
    """The clean input of each block for one batch, from one forward pass without autograd
    (single-stack models: the scorers that re-run the model from a block)."""
    stack = single_stack(model, adapter, what)
    hint = "the dense model already overflows on this calibration batch; score in float32 (dtype: float32)"
    return [step.inputs[0] for step in walk_stack(model, adapter, stack, [batch], device, desc=None, hint=hint)]
