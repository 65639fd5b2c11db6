"""AlphaPruning's layer metric (Lu et al., NeurIPS 2024): the power-law exponent alpha of the
tail of each weight matrix's empirical spectral density (the eigenvalues of W^T W), fitted
by the Hill estimator at the xmin that best fits (smallest Kolmogorov-Smirnov distance).
A heavier tail (smaller alpha) marks a better-trained matrix, to be pruned less
(allocation `alphapruning`). Data-free: the calibration batches are not used.

Written after the authors' `lib/esd_utils.py:net_esd_estimator` (haiquanlu/AlphaPruning,
5f0e984), with their defaults (`fix_fingers="xmin_peak"`, 100 histogram bins, no
zero-eigenvalue filter), including one quirk kept to reproduce their numbers: the lower
bound of the xmin search is `log10(0.95 * peak)`, a log10 value compared with linear
eigenvalues (the upper bound, 1.5 x peak, is linear). Differences: they load the model in
float16 and cast each matrix to float32; here each matrix is cast from the dtype the model
was loaded in (float32 on a CPU), and only the prunable layers of the adapter's blocks are
measured (for a LLaMA these are the same seven matrices per block).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.models.base import Adapter, Batch
from ecoflap.models.offload import resident


def hill_alpha(eigs: torch.Tensor, i: int) -> float:
    """The Hill (maximum-likelihood) exponent of the tail eigs[i:] of an ascending spectrum,
    with xmin = eigs[i]: 1 + n / sum(ln(eig / xmin))."""
    log_eigs = eigs.log()
    n = float(eigs.numel() - i)
    return float(1 + n / (log_eigs[i:].sum() - n * log_eigs[i]))


def matrix_alpha(weight: torch.Tensor, fix_fingers: str = "xmin_peak", bins: int = 100, xmin_pos: int = 2) -> float:
    """alpha of one weight matrix, as the authors' net_esd_estimator computes it."""
    eigs = torch.linalg.svdvals(weight.detach().float().cpu()).pow(2).sort().values  # ascending
    if eigs[0] <= 0:  # log10(0): their histogram (and ours) fails with "range of [-inf, ...] is not finite"
        raise ValueError(f"{int((eigs <= 0).sum())} of the {eigs.numel()} eigenvalues are 0 (the matrix is rank "
                         "deficient: pruned, or with zeroed rows or columns); score the dense model")
    n_eigs = eigs.numel()
    log_eigs = eigs.log()
    if fix_fingers == "xmin_mid":
        return hill_alpha(eigs, int(n_eigs / xmin_pos))
    if fix_fingers != "xmin_peak":
        raise ValueError(f"fix_fingers must be xmin_peak or xmin_mid, got {fix_fingers!r}")
    h = eigs.log10()
    counts = torch.histc(h, bins=bins, min=h.min().item(), max=h.max().item())
    edges = torch.linspace(h.min().item(), h.max().item(), bins + 1)
    peak = 10 ** edges[counts.argmax()]  # left edge of the fullest bin
    xmin_low = torch.log10(0.95 * peak)  # sic: the authors' bound (module docstring)
    xmin_high = 1.5 * peak
    alphas = torch.zeros(n_eigs - 1)
    distances = torch.ones(n_eigs - 1)
    for i, xmin in enumerate(eigs[:-1]):
        if xmin < xmin_low:
            continue
        if xmin > xmin_high:
            break
        n = float(n_eigs - i)
        alpha = 1 + n / (log_eigs[i:].sum() - n * log_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            seq = torch.arange(n) / n
            distances[i] = torch.max(torch.abs(1 - (eigs[i:] / xmin) ** (1 - alpha) - seq))
    return float(alphas[distances.argmin()])


@torch.no_grad()
def esd_alpha_scores(model: nn.Module, adapter: Adapter, batches: list[Batch], device: torch.device,
                     granularity: str = "block", fix_fingers: str = "xmin_peak", bins: int = 100,
                     xmin_pos: int = 2) -> dict[str, float]:
    """{block: mean alpha of its prunable layers} (the authors' block-wise mapping), or
    {layer: alpha} with granularity "layer"."""
    if granularity not in ("block", "layer"):
        raise ValueError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    scores = {}
    for prefix, block in tqdm(adapter.named_blocks(model), desc="ESD alpha", unit="block"):
        with resident(block):  # offload: the block's weights are here only while held
            alphas = {f"{prefix}.{name}": _alpha_of(f"{prefix}.{name}", layer.weight, fix_fingers, bins, xmin_pos)
                      for name, layer in adapter.prunable_layers(block).items()}
        if granularity == "layer":
            scores.update(alphas)
        else:
            values = list(alphas.values())
            scores[prefix] = float(sum(values) / len(values))
    return scores


def _alpha_of(name: str, weight: torch.Tensor, fix_fingers: str, bins: int, xmin_pos: int) -> float:
    try:
        return matrix_alpha(weight, fix_fingers, bins, xmin_pos)
    except ValueError as exc:
        raise ValueError(f"esd_alpha of {name}: {exc}") from None
