"""Where a model's weights wait while a stage runs: on the device, or in host memory.

offload "none": the whole model on the device (as transformers would place it).
offload "cpu":  the blocks stay in host memory; the modules outside them (embeddings, final
                norms, heads, BLIP-2's projection and query tokens) live on the device, and a
                block is copied to the device when it runs and copied back when it returns.
                A stage that works on one block for a while (pruning its layers, perturbing
                its weights) holds it there with `resident(block)`.
offload "auto": "none" when the model fits the device's free memory with room for
                activations, else "cpu"; the choice is logged.

The arithmetic is the same in every mode (the same kernels run on the same device on the
same values); only where a block's weights wait between uses changes, so masks and scores
are bit-identical across modes. Device memory is then one block plus the modules outside
the blocks plus the activations, instead of the whole model.

Why not accelerate's hooks: `cpu_offload` leaves parameters on the meta device and keeps the
real values in a weights map, so pruning (which writes weights) would have to write back into
that map; moving a whole block with `Module.to` keeps the Parameter objects themselves (the
pruners, scorers and gradient hooks hold them by identity) and needs nothing else.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "none", "cpu")
HOST = torch.device("cpu")
# "auto" keeps the whole model on the device only below this share of its free memory: the
# rest is for calibration activations, SparseGPT's Hessians and the evaluation's logits
AUTO_FIT_SHARE = 0.7


@dataclass
class _Home:
    """A block's placement state: the device it runs on, and how many holders need it there."""

    device: torch.device
    holders: int = 0
    keep: bool = False  # set while a backward pass may still reach the block (see keep_on_device)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def choose_offload(requested: str, model: nn.Module, device: torch.device) -> str:
    if requested not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {requested!r}")
    if device.type != "cuda":
        if requested == "cpu":
            log.info("offload cpu on a %s device: the weights already live in host memory; nothing moves", device)
        return "none"
    if requested != "auto":
        return requested
    size = model_bytes(model)
    free, _total = torch.cuda.mem_get_info(device)
    mode = "none" if size < AUTO_FIT_SHARE * free else "cpu"
    log.info("offload auto: model %.2f GB, %s free %.2f GB -> %s", size / 1e9, device, free / 1e9, mode)
    return mode


def check_fits(mode: str, total: int, outside: int, block_sizes: dict[str, int], free: int, device: str) -> None:
    """Stop before loading anything onto a device it cannot fit: the whole model ("none"), or
    the modules outside the blocks plus the largest block ("cpu"). Sizes in bytes."""
    gb = 1e9
    if mode == "none" and total > free:
        raise MemoryError(f"the model's {total / gb:.2f} GB of weights do not fit the {free / gb:.2f} GB free on "
                          f"{device}; set offload: cpu (one block on the device at a time) or auto")
    if mode == "cpu":
        name, largest = max(block_sizes.items(), key=lambda kv: kv[1])
        if outside + largest > free:
            raise MemoryError(
                f"even one block does not fit {device}: block {name} is {largest / gb:.2f} GB and the modules "
                f"outside the blocks (embeddings, heads) {outside / gb:.2f} GB, {(outside + largest) / gb:.2f} GB "
                f"in all, with {free / gb:.2f} GB free. Use a smaller dtype (bfloat16 halves float32), a device "
                "with more memory, or free the device (other processes hold memory on it)")


def place_model(model: nn.Module, blocks: list[nn.Module], device: torch.device, mode: str,
                names: list[str] | None = None) -> None:
    """Put `model` (loaded in host memory) where `mode` says. For "cpu" the blocks stay in
    host memory and their forward moves them to the device for the call. On CUDA, first
    checks that what must sit on the device fits its free memory."""
    block_bytes = [model_bytes(b) for b in blocks]
    outside = model_bytes(model) - sum(block_bytes)
    if device.type == "cuda":
        sizes = {(names[i] if names else f"block {i}"): n for i, n in enumerate(block_bytes)}
        check_fits(mode, outside + sum(block_bytes), outside, sizes, torch.cuda.mem_get_info(device)[0], str(device))
    if mode == "none":
        model.to(device)
        return
    inside = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():  # everything outside the blocks, module by module
        if id(module) in inside:
            continue
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(device)  # keeps the Parameter (tied weights move once)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = b.to(device)
    for block in blocks:
        block.to(HOST)
        block._ecoflap_home = _Home(device)  # read by resident(); absent means "always on the device"
        block.forward = _onloading_forward(block)
    log.info("offload cpu: %d blocks (%.2f GB) wait in host memory; %.2f GB outside them on %s",
             len(blocks), sum(block_bytes) / 1e9, outside / 1e9, device)


def _onloading_forward(block: nn.Module):
    plain = block.forward

    def forward(*args, **kwargs):
        with resident(block):
            return plain(*args, **kwargs)
    return forward


@contextmanager
def resident(block: nn.Module) -> Iterator[None]:
    """Hold `block` on its device for the body (a no-op for a model placed whole)."""
    home: _Home | None = getattr(block, "_ecoflap_home", None)
    if home is None:
        yield
        return
    if home.holders == 0:
        block.to(home.device)
    home.holders += 1
    try:
        yield
    finally:
        home.holders -= 1
        if home.holders == 0 and not home.keep:
            block.to(HOST)


@contextmanager
def keep_on_device(blocks: list[nn.Module]) -> Iterator[None]:
    """For a backward pass with recomputation: a block the backward recomputes must stay on the
    device until its part of the backward is over (autograd checks that a gradient lands on its
    parameter's device, and a block's last backward steps use its unscored weights). The caller
    calls `release(block)` then (scoring/checkpointed.py's BackwardProgress decides when);
    whatever is still held goes back to host memory at the end."""
    homes = [getattr(b, "_ecoflap_home", None) for b in blocks]
    for home in homes:
        if home is not None:
            home.keep = True
    try:
        yield
    finally:
        for block in blocks:
            release(block)


def release(block: nn.Module) -> None:
    """Send a block kept by keep_on_device back to host memory, unless something still runs it."""
    home: _Home | None = getattr(block, "_ecoflap_home", None)
    if home is not None and home.keep:
        home.keep = False
        if home.holders == 0:
            block.to(HOST)


class BlockHolder:
    """Holds one block of a list on the device at a time (for loops that visit a block's units
    one after another): hold(i) releases the block held before, if another, and takes block i;
    hold(None) releases."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.index: int | None = None
        self._held = ExitStack()

    def hold(self, index: int | None) -> None:
        if index == self.index:
            return
        self._held.close()
        self.index = index
        if index is not None:
            self._held.enter_context(resident(self.blocks[index]))


def is_offloaded(model_blocks: list[nn.Module]) -> bool:
    return any(getattr(b, "_ecoflap_home", None) is not None for b in model_blocks)
