"""How DSnoT's swaps change a layer's squared output error ||X W^T - X W'^T||^2 on the
calibration inputs, layer by layer in the model's first block: Wanda's mask against Wanda
followed by DSnoT at a few cycle budgets, with and without the same-sign stop.

DSnoT drives each row's *mean* output error toward zero; this shows what that does to the
whole squared error at a model's own widths (their defaults were set on 4096-wide LLaMA
layers, where 50 swaps per row are about 1 % of a row).

    .venv/bin/python tools/dsnot_layer_check.py --model results/smollm2-135m/model \
        --calibration results/smollm2-135m/calibration.safetensors --sparsity 0.6
"""
from __future__ import annotations

import argparse

import torch

from ecoflap.blocks.walk import feed_layers, walk_stack
from ecoflap.cli import _calibration_batches
from ecoflap.models.loading import load_model
from ecoflap.models.registry import adapter_for
from ecoflap.pruning.dsnot import DSnoTStats, refine_rows
from ecoflap.pruning.masks import rowwise_mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--family", default=None)
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cycles", type=int, nargs="+", default=[5, 20, 50])
    args = p.parse_args()
    torch.set_num_threads(2)
    model, _tok = load_model(args.model, torch.device("cpu"), torch.float32)
    adapter = adapter_for(model, args.family)
    batches = _calibration_batches(args.calibration, args.n_samples, args.batch_size, torch.float32)
    stack = adapter.stacks(model)[0]
    step = next(iter(walk_stack(model, adapter, stack, batches, torch.device("cpu"), "first block", capture=True)))
    layers = adapter.prunable_layers(step.block)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    feed_layers(step, layers, lambda name, x: inputs[name].append(x.detach().clone()))
    print(f"{stack.name} block 0 at sparsity {args.sparsity}: squared output error, DSnoT over Wanda "
          f"(cycles {args.cycles}; same-sign stop off as their default | on)")
    for name, layer in layers.items():
        stats = DSnoTStats(layer.in_features, torch.device("cpu"))
        for x in inputs[name]:
            stats.add_batch(x)
        x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]])
        w = layer.weight.detach().float()
        pruned = rowwise_mask(w.abs() * stats.sq_sum.sqrt(), args.sparsity)

        def error(w_sparse: torch.Tensor) -> float:
            return (x_all @ (w - w_sparse).T).pow(2).sum().item()

        wanda = error(w.masked_fill(pruned, 0))
        ratios = []
        for same_sign in (False, True):
            ratios.append(" ".join(
                f"x{error(refine_rows(w, w.masked_fill(pruned, 0), pruned, stats, max_cycles=c, same_sign=same_sign)[0]) / wanda:.3f}"
                for c in args.cycles))
        print(f"  {name:24s} {tuple(w.shape)!s:12s} Wanda {wanda:10.4g}   {ratios[0]} | {ratios[1]}")


if __name__ == "__main__":
    main()
