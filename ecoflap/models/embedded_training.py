"""The training loop the embedded vision models share (the fashion CLIP and the fashion ViT are
trained here at download time, seeded): shuffled mini-batches over the training set for a number
of epochs, AdamW with a one-cycle schedule, a progress bar. The model's own loss is `loss_of(idx)`,
called on each batch's indices in turn (so each model's random draws happen in the same order)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm


def train_epochs(model: nn.Module, n_items: int, epochs: int, batch_size: int, lr: float, desc: str,
                 loss_of: Callable[[torch.Tensor], torch.Tensor],
                 after_step: Callable[[], None] | None = None) -> float:
    """Returns the last batch's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(n_items / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc=desc, unit="step")
    loss = torch.tensor(float("nan"))
    for _epoch in range(epochs):
        order = torch.randperm(n_items)
        for start in range(0, n_items, batch_size):
            loss = loss_of(order[start:start + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return loss.item()


__all__ = ["train_epochs"]
