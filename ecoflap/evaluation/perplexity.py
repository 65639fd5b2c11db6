"""Perplexity over non-overlapping windows of a held-out text, as Wanda's eval_ppl computes it:
the whole text tokenised once (with the tokenizer's BOS), cut into numel // seq_len windows (the
tail dropped), each window's mean next-token loss, perplexity = exp(mean over windows). Every
window has seq_len - 1 predicted tokens, so exp(total loss / tokens) below is the same number;
batching windows changes only float rounding. The embedded Brown text takes the same path.

With offload cpu or disk (an adapter passed, its blocks offloaded) the windows go through the
model block by block instead (blocks/walk.py, as pruning does): every window's hidden states
through block 0, then block 1, ..., then the final norm and LM head. Each block is brought to
the device (or read from disk) once instead of once per batch, and the numbers are the same:
the same kernels run on the same inputs."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ecoflap.blocks.capture import run_block, single_stack
from ecoflap.blocks.walk import walk_stack
from ecoflap.data.corpora import embedded_text, wikitext2_test
from ecoflap.models.base import Adapter
from ecoflap.models.offload import is_offloaded
from ecoflap.evaluation.intervals import LEVEL, RESAMPLES, perplexity_interval
from ecoflap.utils.runtime import check_finite


def evaluation_text(dataset: str) -> str:
    return wikitext2_test() if dataset == "wikitext2" else embedded_text(dataset)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int, device: torch.device,
               max_windows: int | None = None, batch_size: int = 1, adapter: Adapter | None = None
               ) -> dict[str, float]:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seq_len
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
    starts = range(0, n_windows, batch_size)
    if adapter is not None and is_offloaded(adapter.blocks(model)):
        final = _final_hidden_states(model, adapter, [windows[i:i + batch_size] for i in starts], device)
        logits_of = lambda k, batch: adapter.head(model, final[k].to(device))  # noqa: E731
    else:
        logits_of = lambda k, batch: model(input_ids=batch, use_cache=False).logits  # noqa: E731
    nll, count = 0.0, 0
    window_nll: list[float] = []  # mean loss of each window, for the bootstrap interval
    for k, i in enumerate(tqdm(starts, desc="perplexity", unit="batch")):
        batch = windows[i:i + batch_size].to(device)
        logits = logits_of(k, batch)[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        check_finite(loss, f"perplexity window {i}", "the pruned model diverged; check the pruning log")
        per_window = loss.reshape(batch.shape[0], -1).sum(1)
        nll += per_window.sum().item()
        count += batch[:, 1:].numel()
        window_nll += (per_window / (seq_len - 1)).tolist()
    out = {"perplexity": math.exp(nll / count), "tokens": count, "windows": n_windows, "seq_len": seq_len,
           "window_nll": window_nll}
    if n_windows > 1:
        out["interval"] = list(perplexity_interval(window_nll))
        out["interval_note"] = f"{LEVEL:.0%} percentile bootstrap over the {n_windows} windows ({RESAMPLES} resamples)"
    return out


def _final_hidden_states(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor],
                         device: torch.device) -> list[torch.Tensor]:
    """Every batch of windows through the blocks, block by block: the last block's outputs."""
    stack = single_stack(model, adapter, "perplexity with offload cpu or disk")
    hidden: list[torch.Tensor] = []
    for step in walk_stack(model, adapter, stack, [{"input_ids": b} for b in batches], device, "perplexity blocks",
                           hint="the pruned model diverged; check the pruning log"):
        step.outputs = hidden = [run_block(step.block, inp) for inp in step.inputs]
    return hidden
