"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"; zyxxmu/DSnoT): a training-free
refinement of a layer's mask after the pruner has chosen it. Per output row, the
reconstruction error e = sum_j (W_dense - W_pruned)_j s_j, with s_j the calibration inputs'
per-window sum of input j averaged over windows, is driven toward zero by swaps: regrow one
pruned weight (the one whose W s / var^p most reduces e, of e's sign) and prune one kept
weight (the smallest Wanda score |W| ||X|| among those whose W s has e's sign opposite, so
that e moves back). One grow and one prune per swap: a layer's sparsity never changes.

Hook side: `DSnoTStats.add_batch` (accumulate). Math: `refine_rows` (unstructured) and
`refine_nm` (N:M). Written after `prune_DSnoT` in their `lib/prune.py` (4c029df), with their
defaults (50 cycles, threshold 0.1, var^1 in the grow order, the same-sign test off for
unstructured masks and always on for N:M, MLP layers skipped). Stated differences:
  * after SparseGPT: their SparseGPT path never accumulates its Hessian (so its initial mask
    is columns 0..k-1 of every row); here DSnoT refines SparseGPT's real output. Kept weights
    keep SparseGPT's updated values, a regrown weight gets its dense value, and e is the
    error of those weights (for Wanda and magnitude, which change no kept weight, this is
    their e exactly);
  * kept weights with W s exactly 0, and a pointer that runs out of candidates of the right
    sign, end that row's swaps (their index arithmetic would pick a wrong-signed weight);
  * s and the threshold are on their scale (a window's token sum), so at our shorter
    windows the threshold is relatively looser than at their 2048 tokens.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ecoflap.blocks.capture import RealTokens


class DSnoTStats:
    """Per input channel: the per-window sum of the inputs averaged over windows (their
    `sum_metric_row`), the token-weighted mean of each window's population variance (their
    `var`) and the sum of squares (Wanda's norm, for the prune order)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.col_sum = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.var_sum = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.sq_sum = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.windows = 0
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if isinstance(x, RealTokens):  # a padded stack: windows of different lengths
            self.add_windows(x.float(), x.window_sizes)
            return
        x = x.float()
        x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)  # (windows, tokens, d)
        self.col_sum += x.sum(dim=(0, 1))
        self.var_sum += x.var(dim=1, unbiased=False).sum(0) * x.shape[1]
        self.sq_sum += x.pow(2).sum(dim=(0, 1))
        self.windows += x.shape[0]
        self.tokens += x.shape[0] * x.shape[1]

    def add_windows(self, tokens: torch.Tensor, window_sizes: torch.Tensor) -> None:
        """`tokens` [tokens, d]: the real tokens of windows of `window_sizes` tokens, one window
        after the other. Each window counts once, whatever the batch it came in; a window that
        is all padding has no tokens and is no window."""
        sizes = window_sizes[window_sizes > 0].to(tokens.device)
        window = torch.repeat_interleave(torch.arange(len(sizes), device=tokens.device), sizes)
        means = torch.zeros(len(sizes), tokens.shape[-1], device=tokens.device).index_add_(0, window, tokens)
        means /= sizes.unsqueeze(1)
        self.col_sum += tokens.sum(0)
        self.var_sum += (tokens - means[window]).pow(2).sum(0)  # each window's variance times its tokens
        self.sq_sum += tokens.pow(2).sum(0)
        self.windows += len(sizes)
        self.tokens += tokens.shape[0]

    @property
    def s(self) -> torch.Tensor:
        return self.col_sum / self.windows

    @property
    def var(self) -> torch.Tensor:
        return self.var_sum / self.tokens


def _grow_order(w_dense: torch.Tensor, pruned: torch.Tensor, s: torch.Tensor, var: torch.Tensor,
                pow_of_var: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of each row sorted by W s / var^p with kept weights at 0 (their ordering):
    the front holds the most negative pruned weights, the back the most positive."""
    grow_value = w_dense * s.unsqueeze(0)
    key = torch.where(pruned, grow_value, torch.zeros_like(grow_value))
    if pow_of_var:  # a constant input (variance 0) would give inf/nan in their code; floored here
        key = key / var.clamp_min(1e-12).pow(pow_of_var).unsqueeze(0)
    return grow_value, torch.sort(key, dim=1, stable=True).indices


def _start(w_dense: torch.Tensor, w_pruned: torch.Tensor, pruned: torch.Tensor, stats: DSnoTStats,
           pow_of_var: float) -> tuple[torch.Tensor, ...]:
    """What both branches start from: row indices, the pruner's mask (only its weights are
    ever regrown) and a working copy, the regrown marks, each row's error e, the grow values
    and order, and the prune values (W s of the weights as the pruner left them)."""
    s = stats.s
    error = ((w_dense - w_pruned) * s.unsqueeze(0)).sum(1)
    grow_value, grow_order = _grow_order(w_dense, pruned, s, stats.var, pow_of_var)
    return (torch.arange(w_dense.shape[0], device=w_dense.device), pruned, pruned.clone(),
            torch.zeros_like(pruned), error, grow_value, grow_order, w_pruned * s.unsqueeze(0))


def _swap(active: torch.Tensor, r: torch.Tensor, g: torch.Tensor, p: torch.Tensor, change: torch.Tensor,
          pruned: torch.Tensor, regrown: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """In the active rows, regrow column g and prune column p (in place); returns the new errors."""
    pruned[r[active], p[active]] = True
    pruned[r[active], g[active]] = False
    regrown[r[active], g[active]] = True
    return error + torch.where(active, change, torch.zeros_like(change))


def _grow_candidate(error: torch.Tensor, r: torch.Tensor, grow_order: torch.Tensor, grow_front: torch.Tensor,
                    grow_back: torch.Tensor, initial: torch.Tensor, regrown: torch.Tensor, grow_value: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: whether e > 0 (the sparse output is too small: regrow a positive W s, prune a
    negative one), the weight to regrow (the back of the grow order if so, else the front),
    and whether it is a pruner-pruned, not yet regrown weight of the needed sign."""
    up = error > 0
    g = torch.where(up, grow_order[r, grow_back], grow_order[r, grow_front])
    valid = initial[r, g] & ~regrown[r, g] & torch.where(up, grow_value[r, g] > 0, grow_value[r, g] < 0)
    return up, g, valid


def _finish(w_dense: torch.Tensor, w_pruned: torch.Tensor, pruned: torch.Tensor, regrown: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, mask): kept weights as the pruner left them, regrown ones dense, pruned ones 0."""
    return torch.where(regrown, w_dense, w_pruned).masked_fill(pruned, 0), pruned


def refine_rows(w_dense: torch.Tensor, w_pruned: torch.Tensor, pruned: torch.Tensor, stats: DSnoTStats,
                max_cycles: int = 50, update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0,
                same_sign: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unstructured masks. Returns (weights, pruned mask) after the swaps; every row keeps
    its number of pruned weights."""
    rows, cols = w_dense.shape
    r, initial, pruned, regrown, error, grow_value, grow_order, prune_value = _start(
        w_dense, w_pruned, pruned, stats, pow_of_var_regrowing)
    # kept weights ordered [W s < 0 by ascending Wanda score] + [W s > 0 by descending score]:
    # the front pointer takes the weakest negative one, the back pointer the weakest positive
    wanda = w_pruned.abs() * stats.sq_sum.sqrt().unsqueeze(0)
    rank = torch.empty_like(grow_order)
    rank.scatter_(1, torch.sort(wanda, dim=1, stable=True).indices, torch.arange(cols, device=w_dense.device)
                  .expand(rows, cols).contiguous())
    negative, positive = ~pruned & (prune_value < 0), ~pruned & (prune_value > 0)
    key = torch.where(negative, rank, torch.where(positive, 2 * cols - rank, 3 * cols + rank))
    prune_order = torch.sort(key, dim=1, stable=True).indices
    n_negative, n_positive = negative.sum(1), positive.sum(1)
    grow_front, grow_back = torch.zeros_like(r), torch.full_like(r, cols - 1)
    prune_front, prune_back = torch.zeros_like(r), n_negative + n_positive - 1
    active = torch.ones(rows, dtype=torch.bool, device=w_dense.device)
    initial_sign = torch.sign(error)
    for _ in range(max_cycles):
        active &= error.abs() > update_threshold
        if not active.any():
            break
        up, g, valid = _grow_candidate(error, r, grow_order, grow_front, grow_back, initial, regrown, grow_value)
        p = torch.where(up, prune_order[r, prune_front], prune_order[r, prune_back])
        valid &= torch.where(up, prune_front < n_negative, prune_back >= n_negative)
        change = prune_value[r, p] - grow_value[r, g]
        if same_sign:
            valid &= torch.sign(error + change) == initial_sign
        active &= valid
        error = _swap(active, r, g, p, change, pruned, regrown, error)
        grow_back -= up.long()
        grow_front += (~up).long()
        prune_front += up.long()
        prune_back -= (~up).long()
    return _finish(w_dense, w_pruned, pruned, regrown)


def refine_nm(w_dense: torch.Tensor, w_pruned: torch.Tensor, pruned: torch.Tensor, stats: DSnoTStats, m: int,
              max_cycles: int = 50, update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M masks (their separate branch): the weight pruned in exchange is the kept one with
    the smallest Wanda score in the regrown weight's own group of m, so every group keeps
    its n; the same-sign test always applies."""
    rows, cols = w_dense.shape
    r, initial, pruned, regrown, error, grow_value, grow_order, prune_value = _start(
        w_dense, w_pruned, pruned, stats, pow_of_var_regrowing)
    # pruned and regrown weights are never candidates for pruning (their metric set to inf)
    wanda = (w_pruned.abs() * stats.sq_sum.sqrt().unsqueeze(0)).masked_fill(pruned, float("inf"))
    offsets = torch.arange(m, device=w_dense.device)
    grow_front, grow_back = torch.zeros_like(r), torch.full_like(r, cols - 1)
    active = torch.ones(rows, dtype=torch.bool, device=w_dense.device)
    initial_sign = torch.sign(error)
    for _ in range(max_cycles):
        active &= error.abs() > update_threshold
        if not active.any():
            break
        up, g, valid = _grow_candidate(error, r, grow_order, grow_front, grow_back, initial, regrown, grow_value)
        group = (g // m * m).unsqueeze(1) + offsets  # (rows, m) columns of g's group
        p = group[r, wanda.gather(1, group).argmin(1)]
        valid &= torch.isfinite(wanda[r, p])
        change = prune_value[r, p] - grow_value[r, g]
        active &= valid & (torch.sign(error + change) == initial_sign)
        error = _swap(active, r, g, p, change, pruned, regrown, error)
        wanda[r[active], p[active]] = float("inf")
        grow_back -= up.long()
        grow_front += (~up).long()
    return _finish(w_dense, w_pruned, pruned, regrown)


# A layer's role within its block, from the module names the families give it (its name
# relative to the block). A role, not a name prefix, is what `skip_layers` names, because the
# MLP is "mlp.*" in LLaMA but "fc1"/"fc2" in OPT and "layer.1.DenseReluDense.*" in T5. Every
# prunable layer must have exactly one role (a new family whose names match none is an error,
# never a silently refined MLP).
LAYER_ROLES: dict[str, tuple[str, ...]] = {
    "attention": (
        # LLaMA-likes, OPT, CLIP/SigLIP/BLIP vision (self_attn), timm and Qwen-VL vision (attn),
        # BERT-style text, Q-Former and ViT (attention, crossattention), InternViT (attention)
        r"(^|\.)(self_attn|attn|attention|crossattention)\.",
        r"(^|\.)(SelfAttention|EncDecAttention)\.",  # T5: self- and cross-attention
    ),
    "mlp": (
        r"(^|\.)mlp\.",  # LLaMA-likes (gate/up/down_proj), CLIP/SigLIP/BLIP/timm ViTs (fc1/fc2), Qwen-VL vision
        r"^fc[12]$",  # OPT: the MLP's two Linears sit directly in the block
        r"(^|\.)DenseReluDense\.",  # T5 (layer.1 of an encoder block, layer.2 of a decoder block)
        r"^(intermediate|output)(_query)?\.dense$",  # BERT-style: BLIP text, Q-Former, ViT/DeiT
    ),
}


def layer_role(name: str) -> str:
    """The role ("attention" or "mlp") of the layer `name` (relative to its block)."""
    roles = [role for role, patterns in LAYER_ROLES.items() if any(re.search(p, name) for p in patterns)]
    if len(roles) != 1:
        raise ValueError(f"DSnoT skip_layers: layer {name!r} matches {len(roles) or 'no'} roles of "
                         f"{tuple(LAYER_ROLES)}; add its family's module names to LAYER_ROLES "
                         "(ecoflap/pruning/dsnot.py), or set skip_layers: [] to refine every layer")
    return roles[0]


class DSnoT:
    """The refiner the engine runs after each layer's pruner (`refine: dsnot`)."""

    needs_activations = True

    def __init__(self, max_cycles: int = 50, update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0,
                 skip_layers: tuple[str, ...] | list[str] = ("mlp",), same_sign: bool = False) -> None:
        self.max_cycles = max_cycles
        self.update_threshold = update_threshold
        self.pow_of_var_regrowing = pow_of_var_regrowing
        unknown = [entry for entry in skip_layers if entry not in LAYER_ROLES]
        if unknown:
            raise ValueError(f"DSnoT skip_layers {unknown}: each entry must be a layer role, one of "
                             f"{list(LAYER_ROLES)} (mlp: the block's MLP in every family); [] refines every layer")
        self.skip_layers = tuple(skip_layers)
        self.same_sign = same_sign

    def applies_to(self, name: str) -> bool:
        """Layers (named within their block) of a skipped role keep the pruner's mask: their
        default skips the MLP and refines attention only."""
        return not self.skip_layers or layer_role(name) not in self.skip_layers

    def init_stats(self, layer: nn.Linear) -> DSnoTStats:
        return DSnoTStats(layer.in_features, layer.weight.device)

    def add_batch(self, stats: DSnoTStats, x: torch.Tensor) -> None:
        stats.add_batch(x)

    @torch.no_grad()
    def refine(self, layer: nn.Linear, w_dense: torch.Tensor, pruned: torch.Tensor, stats: DSnoTStats,
               nm: tuple[int, int] | None) -> torch.Tensor:
        """Swap the layer's weights to the refined mask in place; returns the new mask."""
        w_pruned = layer.weight.detach().float()
        options = dict(max_cycles=self.max_cycles, update_threshold=self.update_threshold,
                       pow_of_var_regrowing=self.pow_of_var_regrowing)
        if nm is None:
            weights, mask = refine_rows(w_dense.float(), w_pruned, pruned, stats, same_sign=self.same_sign, **options)
        else:
            weights, mask = refine_nm(w_dense.float(), w_pruned, pruned, stats, nm[1], **options)
        layer.weight.copy_(weights.to(layer.weight.dtype))
        return mask
