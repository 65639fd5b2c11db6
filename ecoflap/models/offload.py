"""Where a model's weights wait while a stage runs: on the device, in host memory, or on disk.

offload "none": the whole model on the device (as transformers would place it).
offload "cpu":  the blocks stay in host memory; the modules outside them (embeddings, final
                norms, heads, BLIP-2's projection and query tokens) live on the device, and a
                block is copied to the device when it runs and copied back when it returns.
                A stage that works on one block for a while (pruning its layers, perturbing
                its weights) holds it there with `resident(block)`.
offload "disk": as "cpu", but a block's weights are not in memory at all between uses:
                the model is built without them (accelerate's init_empty_weights) and a
                block's tensors are read from the checkpoint's safetensors files when it
                is reached, and dropped when it is done. Host memory is then one block
                plus the modules outside the blocks, on a CPU as on a GPU machine. A
                block that pruning has written out is read from its new shard afterwards
                (`point_to`), so a later stack's calibration sees the pruned weights.
offload "auto": "none" when the model fits the device's free memory with room for
                activations; else "cpu" on a GPU when it fits host memory; else "disk".
                The choice and the sizes behind it are logged.

The arithmetic is the same in every mode (the same kernels run on the same device on the
same values); only where a block's weights wait between uses changes, so masks and scores
are bit-identical across modes. Device memory is then one block plus the modules outside
the blocks plus the activations, instead of the whole model.

Why not accelerate's hooks: `cpu_offload` leaves parameters on the meta device and keeps the
real values in a weights map, so pruning (which writes weights) would have to write back into
that map; moving a whole block with `Module.to` keeps the Parameter objects themselves (the
pruners, scorers and gradient hooks hold them by identity) and needs nothing else. Its disk
offload has the same weights-map design over its own folder of numpy files (a second copy of
the model on disk); "disk" here reads the checkpoint's own safetensors files instead, and
builds the weightless model with accelerate's `init_empty_weights`.
"""
from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ecoflap.catalog import ACTIVATION_PLACES, OFFLOAD_MODES
from ecoflap.models.shards import CheckpointFiles

log = logging.getLogger(__name__)

HOST = torch.device("cpu")
# "auto" keeps the whole model on the device (or in host memory) only below this share of
# the free memory: the rest is for calibration activations, SparseGPT's Hessians and logits
AUTO_FIT_SHARE = 0.7


@dataclass
class _Home:
    """A block's placement state: the device it runs on, and how many holders need it there.
    This one (offload: cpu) keeps the block's weights in host memory between uses."""

    device: torch.device
    holders: int = 0
    keep: bool = False  # set while a backward pass may still reach the block (see keep_on_device)

    def onload(self, block: nn.Module) -> None:
        block.to(self.device)

    def offload(self, block: nn.Module) -> None:
        block.to(HOST)


@dataclass
class _DiskHome(_Home):
    """offload: disk. The block's tensors are read from `files` when it is onloaded and
    replaced by stubs when it is offloaded. The Parameter objects stay the same (only their
    data changes), because pruners, scorers and gradient hooks hold them by identity."""

    files: CheckpointFiles | None = None
    tensor_names: dict[str, str] = field(default_factory=dict)  # name in the block -> name in the checkpoint

    def onload(self, block: nn.Module) -> None:
        values = self.files.read(self.tensor_names.values())
        for local, tensor in _block_tensors(block).items():
            tensor.data = values[self.tensor_names[local]].to(self.device, tensor.dtype)

    def offload(self, block: nn.Module) -> None:
        for tensor in _block_tensors(block).values():
            tensor.data = stub(tensor)


def stub(t: torch.Tensor) -> torch.Tensor:
    """A stand-in of `t`'s shape and dtype in host memory that costs one element: the values
    are not there. (Meta tensors would cost nothing, but a Parameter cannot move between
    the meta device and a real one by assigning .data.)"""
    return torch.zeros((), dtype=t.dtype).expand(t.shape)


def _block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's parameters and persistent buffers by name, what its checkpoint holds."""
    return {name: t for name, t in block.state_dict(keep_vars=True).items()}


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def host_available_bytes() -> int:
    """Host memory this process may still use: the kernel's MemAvailable, or less when the
    process sits in a memory cgroup (a SLURM job, a container) with a lower limit."""
    available = _meminfo_available()
    for limit_file, usage_file in _cgroup_memory_files():
        try:
            limit = int(Path(limit_file).read_text().strip())
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):  # "max" (no limit), or no such cgroup
            continue
        available = min(available, max(limit - usage, 0))
    return available


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_memory_files() -> list[tuple[str, str]]:
    """(limit, usage) files of this process's memory cgroup, v1 and v2."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            found.append((f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes"))
        elif controllers == "":
            base = f"/sys/fs/cgroup{path}" if Path("/sys/fs/cgroup/cgroup.controllers").exists() \
                else f"/sys/fs/cgroup/unified{path}"
            found.append((f"{base}/memory.max", f"{base}/memory.current"))
    return found


def choose_offload(requested: str, size: int, device: torch.device) -> str:
    """The mode to load with, for a model of `size` bytes in the dtype it is loaded in."""
    if requested not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {requested!r}")
    if requested == "disk":
        return "disk"
    host = host_available_bytes()
    if device.type != "cuda":
        if requested == "cpu":
            log.info("offload cpu on a %s device: the weights already live in host memory; nothing moves", device)
            return "none"
        if requested == "none":
            return "none"
        mode = "none" if size < AUTO_FIT_SHARE * host else "disk"
        log.info("offload auto: model %.2f GB, host memory available %.2f GB -> %s", size / 1e9, host / 1e9, mode)
        return mode
    if requested != "auto":
        return requested
    free, _total = torch.cuda.mem_get_info(device)
    mode = "none" if size < AUTO_FIT_SHARE * free else "cpu" if size < AUTO_FIT_SHARE * host else "disk"
    log.info("offload auto: model %.2f GB, %s free %.2f GB, host memory available %.2f GB -> %s",
             size / 1e9, device, free / 1e9, host / 1e9, mode)
    return mode


def check_fits(mode: str, total: int, outside: int, block_sizes: dict[str, int], free: int, device: str) -> None:
    """Stop before loading anything onto a device it cannot fit: the whole model ("none"), or
    the modules outside the blocks plus the largest block ("cpu"). Sizes in bytes."""
    gb = 1e9
    if mode == "none" and total > free:
        raise MemoryError(f"the model's {total / gb:.2f} GB of weights do not fit the {free / gb:.2f} GB free on "
                          f"{device}; set offload: cpu (one block on the device at a time) or auto")
    if mode in ("cpu", "disk"):
        name, largest = max(block_sizes.items(), key=lambda kv: kv[1])
        if outside + largest > free:
            raise MemoryError(
                f"even one block does not fit {device}: block {name} is {largest / gb:.2f} GB and the modules "
                f"outside the blocks (embeddings, heads) {outside / gb:.2f} GB, {(outside + largest) / gb:.2f} GB "
                f"in all, with {free / gb:.2f} GB free. Use a smaller dtype (bfloat16 halves float32), a device "
                "with more memory, or free the device (other processes hold memory on it)")


def check_host_fits(outside: int, block_sizes: dict[str, int], available: int) -> None:
    """offload: disk holds the modules outside the blocks and one block in host memory."""
    name, largest = max(block_sizes.items(), key=lambda kv: kv[1])
    if outside + largest > available:
        gb = 1e9
        raise MemoryError(
            f"offload disk needs block {name} ({largest / gb:.2f} GB) and the modules outside the blocks "
            f"(embeddings, heads; {outside / gb:.2f} GB) in host memory at once, {(outside + largest) / gb:.2f} GB, "
            f"and {available / gb:.2f} GB are available to this job. Give the job more memory (resources.mem_mb, "
            "SLURM's --mem), or load a smaller dtype (bfloat16 halves float32)")


def place_model(model: nn.Module, blocks: list[nn.Module], device: torch.device, mode: str,
                names: list[str] | None = None, files: CheckpointFiles | None = None) -> None:
    """Put `model` (loaded in host memory; for "disk", its blocks holding stubs) where `mode`
    says. For "cpu" and "disk" the blocks' forward brings them to the device for the call;
    "disk" reads them from `files`. On CUDA, first checks that what must sit on the device
    fits its free memory."""
    names = names or [f"block {i}" for i in range(len(blocks))]
    block_bytes = [model_bytes(b) for b in blocks]  # a stub's size counts as the real tensor's
    outside = model_bytes(model) - sum(block_bytes)
    if device.type == "cuda":
        sizes = dict(zip(names, block_bytes))
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
    for name, block in zip(names, blocks):
        if mode == "disk":
            tensor_names = {local: f"{name}.{local}" for local in _block_tensors(block)}
            block._ecoflap_home = _DiskHome(device, files=files, tensor_names=tensor_names)
        else:
            block.to(HOST)
            block._ecoflap_home = _Home(device)  # read by resident(); absent means "always on the device"
        block.forward = _onloading_forward(block)
    log.info("offload %s: %d blocks (%.2f GB) wait %s; %.2f GB outside them on %s", mode, len(blocks),
             sum(block_bytes) / 1e9, "in host memory" if mode == "cpu" else "on disk, read one at a time",
             outside / 1e9, device)


def point_to(block: nn.Module, path: Path) -> None:
    """offload: disk reads `block` from `path` from now on (pruning wrote it there)."""
    home = getattr(block, "_ecoflap_home", None)
    if isinstance(home, _DiskHome):
        home.files.point(home.tensor_names.values(), path)


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
        home.onload(block)
    home.holders += 1
    try:
        yield
    finally:
        home.holders -= 1
        if home.holders == 0 and not home.keep:
            home.offload(block)


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
            home.offload(block)


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


def offload_mode(model_blocks: list[nn.Module]) -> str:
    """"none", "cpu" or "disk": how these blocks were placed."""
    homes = [getattr(b, "_ecoflap_home", None) for b in model_blocks]
    if any(isinstance(h, _DiskHome) for h in homes):
        return "disk"
    return "cpu" if any(h is not None for h in homes) else "none"


# --- calibration activations -------------------------------------------------------------------
# Between two blocks, the hidden states of every calibration batch wait for the next block:
# n_samples x seq_len x hidden values (128 x 2048 x 8192 in bf16 is 4 GB for LLaMA-70B).
# "cpu" parks them in host memory and moves one batch at a time to the device (BlockInput.
# device); the arithmetic is the same. "auto" decides per stack once they are captured.
ACTIVATIONS_AUTO_SHARE = 0.3


def set_activation_place(model: nn.Module, place: str) -> None:
    if place not in ACTIVATION_PLACES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_PLACES)}, got {place!r}")
    model._ecoflap_activations = place


def park_activations(model: nn.Module, hidden: list[torch.Tensor], device: torch.device, what: str) -> bool:
    """Whether these hidden states (one per batch) should wait in host memory; logs the choice."""
    place = getattr(model, "_ecoflap_activations", "auto")
    if device.type != "cuda" or place == "device":
        return False
    size = sum(h.numel() * h.element_size() for h in hidden)
    if place == "cpu":
        park = True
    else:
        free = torch.cuda.mem_get_info(device)[0]
        park = size > ACTIVATIONS_AUTO_SHARE * free
        log.info("activations auto for %s: %.2f GB of hidden states, %.2f GB free on %s -> %s", what, size / 1e9,
                 free / 1e9, device, "cpu" if park else "device")
    if park:
        log.info("activations of %s wait in host memory (%.2f GB); each batch visits %s when its block runs",
                 what, size / 1e9, device)
    return park
