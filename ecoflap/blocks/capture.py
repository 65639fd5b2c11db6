"""Calibration capture: what each stack's blocks are called with, and running one block.

Forward pre-hooks on a stack's blocks record exactly what the model passes to them
(hidden states plus the other positional and keyword arguments: attention masks, rotary
embeddings, T5's position bias, the Q-Former's image features) and stop the forward pass
there, as Wanda's `Catcher` does, but without knowing the model's signature. Because the
whole model runs up to the stack, a stack's inputs always come from the current (already
pruned) weights of the stacks before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ecoflap.models.base import Adapter, Batch, Stack, batch_to

_CACHE_KEYS = ("cache", "past_key_value", "past_key_values")


@dataclass
class Injection:
    """What a model adds to a block's output before the next block sees it (Qwen3-VL's DeepStack):
    float32 `values` [n, hidden] at the `where` [batch, positions] positions."""

    where: torch.Tensor
    values: torch.Tensor

    def to(self, device: torch.device) -> "Injection":
        return Injection(self.where.to(device), self.values.to(device))

    def added_to(self, output: torch.Tensor) -> torch.Tensor:
        where = self.where.to(output.device)
        out = output.clone()
        out[where] = (output[where].float() + self.values.to(output.device)).to(output.dtype)
        return out


@dataclass
class BlockInput:
    """One calibration batch as it enters a block."""

    hidden: torch.Tensor | None  # None for a later block of a stack: its input comes from the block before
    args: tuple  # positional arguments after the hidden states
    kwargs: dict[str, Any]
    batch: Batch  # kept for the loss at the end of the model
    valid: torch.Tensor | None = None  # [batch, positions]: False at padding
    # activations: cpu. The hidden states wait in host memory and go to this device only
    # while the block runs on them; the block's output comes back to host memory
    device: torch.device | None = None
    # Stack.injects_between_blocks: what the model adds to this block's output before the next
    # block (next input minus this output, from the capture pass); None: nothing
    injection: Injection | None = None
    # Stack.cross_mask_key: [batch, encoder positions], False at the padding of the states the
    # block's cross-attention reads (handed to the block as one of its arguments)
    cross_valid: torch.Tensor | None = None
    # Stack.leading_real: [batch, positions after the leading ones], False at padding, for the layers
    # that run on those positions alone (InstructBLIP's Q-Former text FFN); `valid` then covers all
    tail_valid: torch.Tensor | None = None

    def with_hidden(self, hidden: torch.Tensor | None, device: torch.device | None = None) -> "BlockInput":
        return BlockInput(hidden, self.args, self.kwargs, self.batch, self.valid, device or self.device,
                          self.injection, self.cross_valid, self.tail_valid)

    def next_input(self, output: torch.Tensor) -> torch.Tensor:
        """This block's output as the next block receives it: with the injection added (Qwen3-VL's
        DeepStack), rounded once to the hidden states' dtype as the model itself does."""
        return output if self.injection is None else self.injection.added_to(output)

    def real_positions(self, x: torch.Tensor) -> torch.Tensor:
        """A layer input without its padding positions (statistics must not see padding): on a
        stack with a mask_key, the real tokens as `RealTokens` (which still know their windows)."""
        if self.cross_valid is not None and x.shape[:-1] == self.cross_valid.shape and self._handed_in(x):
            # the encoder's states, passed as they are to the cross-attention's k and v: their own
            # padding (the block's mask is for its own positions; at equal lengths it would fit, wrongly)
            return RealTokens.of(x, self.cross_valid)
        if self.valid is not None and x.shape[:-1] == self.valid.shape:
            return RealTokens.of(x, self.valid)
        if self.tail_valid is not None and x.shape[:-1] == self.tail_valid.shape:
            return RealTokens.of(x, self.tail_valid)
        if self.valid is not None and x.dim() == 2 and x.shape[0] == self.valid.numel() and self.valid.dim() == 2:
            # the block flattened its positions ([batch * positions, features]: OPT's fc1 and fc2)
            return RealTokens.of(x.reshape(*self.valid.shape, x.shape[-1]), self.valid)
        return x

    def _handed_in(self, x: torch.Tensor) -> bool:
        """Whether `x` is one of the block's arguments itself (not something the block computed)."""
        return any(x is a for a in (*self.args, *self.kwargs.values()))


class RealTokens(torch.Tensor):
    """A padded layer input without its padding: [tokens, features], each window's real tokens
    in turn, and `window_sizes` [windows], how many real tokens each window has. Flattening
    loses the windows, and DSnoT's statistics are per window (a per-window sum averaged over
    windows), so they travel with the tokens. Like nn.Parameter, any operation on it gives a
    plain tensor: Wanda and SparseGPT see ordinary [tokens, features] inputs."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    window_sizes: torch.Tensor

    @staticmethod
    def of(x: torch.Tensor, valid: torch.Tensor) -> "RealTokens":
        tokens = x[valid].as_subclass(RealTokens)
        tokens.window_sizes = valid.reshape(-1, valid.shape[-1]).sum(-1)
        return tokens


def valid_positions(stack: Stack, batch: Batch, key: str | None = None) -> torch.Tensor | None:
    """Where the batch entry `key` (default: the stack's mask_key) marks real positions."""
    key = key or stack.mask_key
    if key is None or key not in batch:
        return None
    mask = batch[key]
    return mask != -100 if key == "labels" else mask.bool()


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been recorded."""


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


def _clean(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Split off the hidden states; drop KV caches (every block is run many times)."""
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    rest = tuple(None if _is_cache(a) else a for a in args[1:])
    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS and not _is_cache(v)}
    return hidden, rest, kwargs


@torch.no_grad()
def capture_stack_inputs(model: nn.Module, adapter: Adapter, stack: Stack, batches: list[Batch],
                         device: torch.device) -> list[list[BlockInput]]:
    """For each batch (and each run of the stack within one forward pass), the input of
    every block of `stack` ([sequence][block]). Only block 0's hidden states are real
    inputs and kept; later blocks get theirs from the block before, on the way. Unless the stack has
    per-block arguments, block 0's are reused for every block and the forward stops there.
    A stack that injects between blocks also has its blocks' outputs recorded: a block's
    injection is the next block's input minus its output, in float32 (exact for bf16 and fp16
    hidden states; within one float32 rounding for float32 ones)."""
    blocks = adapter.stack_blocks(model, stack)
    watched = blocks if stack.per_block_inputs else blocks[:1]
    expected = len(watched) * stack.calls
    calls: list[tuple[torch.Tensor, tuple, dict]] = []
    outputs: list[torch.Tensor] = []  # injects_between_blocks: every block's output but the last's

    def record_output(_module: nn.Module, _args: tuple, output) -> None:
        outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def make_hook(last: bool):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append(_clean(args, kwargs))
            if last and len(calls) == expected:
                raise StopForward
        return hook

    handles = [b.register_forward_pre_hook(make_hook(j == len(watched) - 1), with_kwargs=True)
               for j, b in enumerate(watched)]
    if stack.injects_between_blocks:
        handles += [b.register_forward_hook(record_output) for b in blocks[:-1]]
    out = []
    try:
        for batch in batches:
            batch = batch_to(batch, device)
            calls.clear()
            outputs.clear()
            try:
                adapter.forward(model, batch)
            except StopForward:
                pass
            if len(calls) != expected:
                raise RuntimeError(f"the calibration forward made {len(calls)} of {expected} expected block calls "
                                   f"in {stack.path}; the adapter's forward or Stack.calls is wrong")
            valid = valid_positions(stack, batch)
            tail_valid = None
            if stack.leading_real and valid is not None:  # the mask marks the positions after the leading ones
                tail_valid = valid
                valid = torch.cat([valid.new_ones(valid.shape[0], stack.leading_real), valid], 1)
            for c in range(stack.calls):
                cross_valid = valid_positions(stack, batch, stack.cross_mask_key) if stack.cross_mask_key else None
                per_block = [BlockInput(h, a, k, batch, valid, cross_valid=cross_valid, tail_valid=tail_valid)
                             for h, a, k in calls[c * len(watched):(c + 1) * len(watched)]]
                if stack.injects_between_blocks:
                    _set_injections(per_block, outputs[c * (len(blocks) - 1):(c + 1) * (len(blocks) - 1)])
                for inp in per_block[1:]:  # only block 0's hidden states are inputs; the rest would be held in vain
                    inp.hidden = None
                out.append(per_block if stack.per_block_inputs else per_block * len(blocks))
    finally:
        for h in handles:
            h.remove()
    return out


def _set_injections(per_block: list[BlockInput], outputs: list[torch.Tensor]) -> None:
    """Block j's injection: block j+1's input minus block j's output, at the positions where they differ."""
    for inp, nxt, output in zip(per_block, per_block[1:], outputs):
        difference = nxt.hidden.float() - output.float()
        where = difference.ne(0).any(-1)
        inp.injection = Injection(where, difference[where]) if where.any() else None


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    hidden = inp.hidden if inp.device is None else inp.hidden.to(inp.device)
    out = block(hidden, *inp.args, **inp.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out if inp.device is None else out.to(inp.hidden.device)


def single_stack(model: nn.Module, adapter: Adapter, what: str) -> Stack:
    """Stages that re-run the model from a block to the loss need one stack and a head."""
    stacks = adapter.stacks(model)
    if len(stacks) != 1 or not adapter.capabilities.single_stack:
        raise ValueError(f"{what} re-runs the model from one block to the loss, which is implemented for "
                         f"single-stack language models only; {adapter.family} has stacks "
                         f"{[s.name for s in stacks]}. Use zeroth_order with reuse_block_inputs: false, or first_order")
    return stacks[0]
