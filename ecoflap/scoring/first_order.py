"""First-order importance (ECoFLaP's first-order variant): per unit, sum over batches of
sum |g| or sum |w * g| from true gradients of the calibration loss. Costs backward-pass
memory (all activations and the gradients of the scored weights)."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.base import Adapter, Batch, batch_to
from ecoflap.models.offload import is_offloaded
from ecoflap.scoring.units import first_order_term, gradients_only_for, scoring_units
from ecoflap.utils.runtime import check_finite


def first_order_scores(model: nn.Module, adapter: Adapter, batches: list[Batch], device: torch.device,
                       granularity: str = "block", reduce: str = "abs_wg") -> dict[str, float]:
    if reduce not in ("abs_g", "abs_wg"):
        raise ValueError(f"first-order reduce must be abs_g or abs_wg, got {reduce!r}")
    if is_offloaded(adapter.blocks(model)):
        raise ValueError("first_order runs one backward pass over the whole model, so every block's weights and "
                         "activations are on the device at once and offload: cpu cannot apply. Use offload: none, "
                         "or the scorer kind checkpointed with the same reduce (abs_wg: the same first-order score "
                         "computed block by block, one block on the device)")
    units = scoring_units(model, adapter, granularity)
    scores = {u.name: 0.0 for u in units}
    with gradients_only_for(model, units):
        for bi, batch in enumerate(tqdm(batches, desc="first-order scores", unit="batch")):
            loss = adapter.loss(model, batch_to(batch, device))
            check_finite(loss.detach(), f"first-order calibration loss (batch {bi})", "use float32 or bfloat16")
            loss.backward()
            with torch.no_grad():
                for u in units:
                    # a weight the loss never reaches has no .grad (LLaVA's last vision block, whose output
                    # vision_feature_layer -2 skips): its gradient is 0, as the checkpointed scorer counts it
                    scores[u.name] += sum(first_order_term(w.grad, w, reduce) for w in u.weights if w.grad is not None)
            model.zero_grad(set_to_none=True)
    return scores
