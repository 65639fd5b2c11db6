"""Mask selection shared by every pruner: lowest scores per output row, or N:M groups."""
from __future__ import annotations

import torch


def row_prune_count(n_cols: int, sparsity: float, counts: str = "round") -> int:
    """Weights pruned in a row of `n_cols`: the fraction to the nearest weight ("round"), or
    int(n_cols * sparsity) as Wanda's lib/prune.py and the ECoFLaP authors' pruners count
    ("reference": one weight fewer wherever the fraction's remainder is .5 or more)."""
    return int(n_cols * sparsity) if counts == "reference" else int(round(n_cols * sparsity))


def rowwise_mask(score: torch.Tensor, sparsity: float, counts: str = "round") -> torch.Tensor:
    """True where a weight is pruned: the `sparsity` fraction of lowest scores in each row."""
    k = row_prune_count(score.shape[1], sparsity, counts)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def check_nm_width(cols: int, n: int, m: int) -> None:
    if cols % m:
        raise ValueError(f"N:M {n}:{m} needs the input dimension ({cols}) to be a multiple of {m}")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where pruned: the n lowest scores in every group of m consecutive inputs of a row."""
    rows, cols = score.shape
    check_nm_width(cols, n, m)
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def matrix_threshold_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold over the whole matrix, exactly as ECoFLaP's BLIP-2 Wanda pruner treats the
    ViT: prune every score <= the int(numel * sparsity)-th smallest (so floor(numel * s) + 1
    weights, more on ties; wanda_pruner.py in ylsung/ECoFLaP). Sparsity 0 prunes nothing (a
    block kept dense), where their comparison would still take the lowest weight."""
    if sparsity <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    flat = score.flatten()
    k = min(int(flat.numel() * sparsity), flat.numel() - 1)
    threshold = torch.kthvalue(flat.float().cpu(), k + 1).values.to(score.device)
    return score <= threshold


COMPARISON_GROUPS = ("row", "matrix")


def check_comparison_group(group: str) -> None:
    if group not in COMPARISON_GROUPS:
        raise ValueError(f"comparison group must be one of {COMPARISON_GROUPS}, got {group!r}")


def select_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, group: str = "row",
                counts: str = "round") -> torch.Tensor:
    """N:M groups, else the lowest scores within each output row ("row", Wanda's default) or
    under one threshold for the whole matrix ("matrix", which counts as its reference code
    whatever `counts` says)."""
    check_comparison_group(group)
    if nm:
        return nm_mask(score, *nm)
    if group == "matrix":
        return matrix_threshold_mask(score, sparsity)
    return rowwise_mask(score, sparsity, counts)


def parse_nm(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): prune 2 of every 4 consecutive weights in a row."""
    if not pattern:
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError as exc:
        raise ValueError(f"N:M pattern {pattern!r} must look like '2:4'") from exc
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {pattern!r} needs 0 < N < M")
    return n, m
