"""Layer-wise pruners plugged into the sequential engine. Each one says whether it needs
calibration activations, how it accumulates them, and how it turns them into a mask
(SparseGPT also updates the surviving weights)."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ecoflap import catalog
from ecoflap.pruning.masks import check_comparison_group, check_nm_width, matrix_threshold_mask, nm_mask, select_mask

log = logging.getLogger(__name__)


class Magnitude:
    """|W|, compared within each output row. Needs no calibration data."""

    needs_activations = False

    def __init__(self, counts: str = "round") -> None:
        self.counts = counts  # catalog.COUNT_RULES: how many weights a ratio prunes

    def init_stats(self, layer: nn.Linear) -> None:
        return None

    def add_batch(self, stats: None, x: torch.Tensor) -> None:
        pass

    @torch.no_grad()
    def prune(self, layer: nn.Linear, stats: None, sparsity: float, nm: tuple[int, int] | None,
              group: str = "row") -> torch.Tensor:
        mask = select_mask(layer.weight.abs().float(), sparsity, nm, group, self.counts)
        layer.weight[mask] = 0
        return mask


class Wanda:
    """|W_ij| * ||X_j||_2 over the calibration tokens, compared within each output row."""

    needs_activations = True

    def __init__(self, counts: str = "round") -> None:
        self.counts = counts  # catalog.COUNT_RULES: how many weights a ratio prunes

    def init_stats(self, layer: nn.Linear) -> torch.Tensor:
        return torch.zeros(layer.in_features, device=layer.weight.device, dtype=torch.float32)

    def add_batch(self, sq_norms: torch.Tensor, x: torch.Tensor) -> None:
        sq_norms += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)

    @torch.no_grad()
    def prune(self, layer: nn.Linear, sq_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
              group: str = "row") -> torch.Tensor:
        score = layer.weight.abs().float() * sq_norms.sqrt().unsqueeze(0)
        mask = select_mask(score, sparsity, nm, group, self.counts)
        layer.weight[mask] = 0
        return mask


class SparseGPT:
    """OBS reconstruction (Frantar & Alistarh 2023): columns processed in blocks of
    `block_size`, mask chosen per block by w^2 / diag(H^-1)^2, errors propagated lazily."""

    needs_activations = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, counts: str = "round",
                 damping: str = "always") -> None:
        self.block_size = block_size
        self.damp = damp
        self.damping = damping  # "always" (SparseGPT's and Wanda's code) or "on_failure" (the ECoFLaP authors')
        self.counts = counts  # catalog.COUNT_RULES: how many weights of a column block a ratio prunes
        self.warned_group = False

    def init_stats(self, layer: nn.Linear) -> dict:
        return {"H": torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device,
                                 dtype=torch.float32), "n": 0}

    def add_batch(self, stats: dict, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n_new = x.shape[0]
        stats["H"] *= stats["n"] / (stats["n"] + n_new)
        stats["n"] += n_new
        x = math.sqrt(2 / stats["n"]) * x
        stats["H"] += x.t() @ x

    def _note_group(self, group: str) -> None:
        """The comparison group is a `pruning:` setting shared by every method of a config (the
        BLIP-2 paper configs compare Wanda's ViT scores per matrix and run SparseGPT beside it),
        so a valid one is accepted here, and said (once) to be without effect."""
        check_comparison_group(group)
        if group != "row" and not self.warned_group:
            log.warning("SparseGPT ignores comparison group %r: its own rule is one threshold per column block "
                        "over all rows (the reference code's)", group)
            self.warned_group = True

    def _check_nm(self, cols: int, nm: tuple[int, int] | None) -> None:
        """N:M groups are chosen inside a column block, so a block must hold whole groups."""
        if nm is None:
            return
        n, m = nm
        check_nm_width(cols, n, m)  # the layer's width: nm_mask only sees one column block's
        if self.block_size % m:
            raise ValueError(f"SparseGPT with N:M {n}:{m}: block_size ({self.block_size}) must be a multiple of M "
                             f"({m}); set pruning.sparsegpt_block_size to a multiple of {m}")

    @torch.no_grad()
    def prune(self, layer: nn.Linear, stats: dict, sparsity: float, nm: tuple[int, int] | None,
              group: str = "row") -> torch.Tensor:
        self._note_group(group)
        self._check_nm(layer.in_features, nm)
        # the statistics are used up here: H is modified in place and the stats let go of it,
        # so that no more than two columns x columns matrices are alive at once (down_proj of a
        # 7B model: 11008^2 floats, 485 MB each); the values are the reference code's
        H = stats.pop("H")
        if nm is None and sparsity == 0:  # kept dense (dense_blocks, a ratio of 0): not one weight changes
            return torch.zeros_like(layer.weight, dtype=torch.bool)
        W = layer.weight.detach().float().clone()
        rows, cols = W.shape
        # inputs never active on the calibration data (H's diagonal 0): the reference code zeroes
        # their weights in a layer it prunes, whatever the saliency, and so does this one; they
        # are marked pruned (below), so that the mask and its hash say which weights are 0
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if self.damping == "always":
            H.diagonal().add_(self.damp * torch.mean(torch.diag(H)))  # H + damp * mean(diag) * I
            try:
                factor = torch.linalg.cholesky(H)
                del H
                Hinv = torch.cholesky_inverse(factor)
                del factor
                Hinv = torch.linalg.cholesky(Hinv, upper=True)
            except torch.linalg.LinAlgError as exc:
                raise FloatingPointError("SparseGPT: Hessian not positive definite even after dampening; "
                                         "raise pruning.sparsegpt_damp or use more calibration samples") from exc
        else:  # "on_failure", the ECoFLaP authors' sparsegpt_pruner.py
            factor = _cholesky_damped_on_failure(H, self.damp * torch.mean(torch.diag(H)))
            del H
            Hinv = torch.cholesky_inverse(factor)
            del factor
            Hinv = _cholesky_damped_on_failure(Hinv, self.damp * torch.mean(torch.diag(Hinv).abs()), upper=True)
        mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, self.block_size):
            i2 = min(i1 + self.block_size, cols)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            d = torch.diag(Hinv1)
            if nm is None:
                # unstructured: as in the reference code, one threshold over the whole
                # column block (all rows), on the OBS saliency w^2 / diag(H^-1)^2
                score = W1.pow(2) / d.pow(2).unsqueeze(0)
                if self.counts == "reference":  # every saliency <= the int(n s)-th smallest (sparsegpt.py's thresh)
                    mask1 = matrix_threshold_mask(score, sparsity)
                else:
                    k = int(round(score.numel() * sparsity))
                    mask1 = torch.zeros(score.numel(), dtype=torch.bool, device=W.device)
                    if k:
                        mask1[torch.topk(score.flatten(), k, largest=False).indices] = True
                    mask1 = mask1.reshape(score.shape)
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                w, dd = W1[:, i], Hinv1[i, i]
                if nm is not None and i % nm[1] == 0:
                    n_, m_ = nm
                    g = W1[:, i:i + m_].pow(2) / torch.diag(Hinv1)[i:i + m_].pow(2).unsqueeze(0)
                    mask1[:, i:i + m_] = nm_mask(g, n_, m_)
                q = w.clone()
                q[mask1[:, i]] = 0
                err = (w - q) / dd
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            mask[:, i1:i2] = mask1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        mask[:, dead] = True
        W[mask] = 0
        layer.weight.copy_(W.to(layer.weight.dtype))
        return mask


def _cholesky_damped_on_failure(A: torch.Tensor, damp: torch.Tensor, upper: bool = False,
                                 attempts: int = 1000) -> torch.Tensor:
    """The Cholesky factor of A as ylsung/ECoFLaP's sparsegpt_pruner.py takes it: undamped first, and
    `damp` added to the diagonal again after every failure (an error, or NaN in the factor) until one
    succeeds. A is modified in place. Theirs loops without end; this one gives up after `attempts`."""
    for _ in range(attempts):
        factor, info = torch.linalg.cholesky_ex(A, upper=upper)
        if info.item() == 0 and not torch.isnan(factor).any():
            return factor
        A.diagonal().add_(damp)
    raise FloatingPointError(f"SparseGPT (sparsegpt_damping: on_failure): no Cholesky factor after adding {damp.item():g} "
                             f"to the diagonal {attempts} times; use more calibration samples or sparsegpt_damping: always")


def make_pruner(name: str, **options: float) -> Magnitude | Wanda | SparseGPT:
    """The pruner `name` of catalog.PRUNERS, built with `options` (its catalog options)."""
    if name not in catalog.PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; use one of {', '.join(catalog.PRUNERS)}")
    return catalog.PRUNERS[name].load()(**options)
