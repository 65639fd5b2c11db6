"""`pruning.counts`: how many weights a ratio prunes. `round` (the default) prunes the ratio of
each row (SparseGPT: of each column block) to the nearest weight; `reference` counts as the code
behind the published numbers does, so that the paper configs prune exactly what it pruned:
Wanda's lib/prune.py keeps the first int(cols x s) of each row's sorted scores, SparseGPT's
fasterprune prunes every saliency <= the int(n x s)-th smallest of a column block. Both are
re-implemented below line by line from those files, in plain torch."""
import json
import math

import pytest
import torch
from torch import nn

from ecoflap.cli import main
from ecoflap.config import ConfigError, validate_config
from ecoflap.pruning.masks import row_prune_count
from ecoflap.pruning.methods import make_pruner

COLS = 2048


def wandas_row_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """locuslab/wanda lib/prune.py, unstructured: sort each row, prune the first int(cols x s)."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    sort_res = torch.sort(metric, dim=-1, stable=True)
    indices = sort_res[1][:, :int(metric.shape[1] * sparsity)]
    mask.scatter_(1, indices, True)
    return mask


def sparsegpts_fasterprune(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                           percdamp: float = 0.01) -> torch.Tensor:
    """IST-DASLab/sparsegpt sparsegpt.py fasterprune, unstructured, no quantizer: the pruned weights."""
    W, H = W.clone().float(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    return _prune_column_blocks(W, Hinv, sparsity, blocksize)


def _prune_column_blocks(W: torch.Tensor, Hinv: torch.Tensor, sparsity: float, blocksize: int) -> torch.Tensor:
    """fasterprune's column-block loop (the same in SparseGPT's and the ECoFLaP authors' file)."""
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _layer(rows: int, cols: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows, bias=False)
    return layer


def _prune(name: str, layer: nn.Linear, x: torch.Tensor, sparsity: float, counts: str):
    pruner = make_pruner(name, counts=counts)
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, x)
    H = stats["H"].clone() if isinstance(stats, dict) else None
    mask = pruner.prune(layer, stats, sparsity, None)
    return mask, H


def test_the_two_rules_differ_where_the_remainder_is_half_or_more():
    assert row_prune_count(COLS, 0.6) == 1229 and row_prune_count(COLS, 0.6, "reference") == 1228
    assert row_prune_count(COLS, 0.5) == row_prune_count(COLS, 0.5, "reference") == 1024
    assert row_prune_count(100, 0.29, "reference") == int(100 * 0.29) == 28  # the float product, as theirs


@pytest.mark.parametrize("sparsity", [0.6, 0.537])
def test_reference_wanda_prunes_what_wandas_lib_prune_prunes(sparsity):
    layer = _layer(16, COLS)
    x = torch.randn(64, COLS)
    metric = layer.weight.detach().abs() * x.pow(2).sum(0).sqrt().unsqueeze(0)  # |W| ||X||, their W_metric
    theirs = wandas_row_mask(metric, sparsity)
    mask, _ = _prune("wanda", _layer(16, COLS), x, sparsity, "reference")
    assert torch.equal(mask, theirs)
    rounded, _ = _prune("wanda", _layer(16, COLS), x, sparsity, "round")
    assert (rounded.sum(1) == round(COLS * sparsity)).all()
    assert (mask.sum(1) == math.floor(COLS * sparsity)).all() and not torch.equal(rounded, mask)


def test_reference_sparsegpt_prunes_and_updates_as_fasterprune():
    rows, cols, sparsity = 24, 256, 0.6  # 24 x 128 x 0.6 = 1843.2 per block: int 1843, so 1844 pruned
    layer = _layer(rows, cols, seed=1)
    dense = layer.weight.detach().clone()
    x = torch.randn(200, cols)
    x[:, 5] = 0  # an input never active: both zero its weights
    mask, H = _prune("sparsegpt", layer, x, sparsity, "reference")
    theirs = sparsegpts_fasterprune(dense, H, sparsity)
    assert torch.equal(mask | (dense == 0), (theirs == 0) | (dense == 0))
    assert torch.allclose(layer.weight, theirs, atol=1e-5, rtol=1e-4)
    per_block = mask[:, :128].sum().item()
    assert per_block == int(rows * 128 * sparsity) + 1
    rounded, _ = _prune("sparsegpt", _layer(rows, cols, seed=1), x, sparsity, "round")
    assert rounded[:, 128:].sum().item() == round(rows * 128 * sparsity)


def test_counts_reach_the_pruner_from_the_prune_spec(tiny_dir, tmp_path):
    """The `pruning:` entry's counts through the CLI, as the prune rule passes it."""
    main(["download", "--spec", json.dumps({"source": "local", "path": str(tiny_dir)}), "--out",
          str(tmp_path / "m"), "--layout", str(tmp_path / "layout.json")])
    main(["allocate", "--layout", str(tmp_path / "layout.json"), "--target", "0.55", "--out", str(tmp_path / "a.json"),
          "--spec", json.dumps({"allocation": "uniform"})])
    zeros = {}
    for counts in ("round", "reference"):
        out = tmp_path / counts
        main(["prune", "--model", str(tmp_path / "m"), "--allocation", str(tmp_path / "a.json"), "--device", "cpu",
              "--spec", json.dumps({"pruner": "magnitude", "counts": counts}), "--out", str(out / "model"),
              "--report", str(out / "pruning.json")])
        report = json.loads((out / "pruning.json").read_text())
        assert report["provenance"]["config"]["counts"] == counts
        zeros[counts] = report["global_sparsity"]
    # the tiny LLaMA's rows are 32 and 64 wide: 17.6 and 35.2 weights, so 18 and 35 rounded, 17 and 35 as theirs
    assert zeros["reference"] < zeros["round"]


def test_an_unknown_count_rule_is_refused():
    with pytest.raises(ConfigError, match="counts"):
        validate_config({"models": {"m": {"source": "embedded"}}, "pruning": {"counts": "floor"}})


def ecoflaps_sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                       percdamp: float = 0.01) -> torch.Tensor:
    """ylsung/ECoFLaP LAVIS/lavis/compression/pruners/sparsegpt_pruner.py fasterprune, unstructured: as
    SparseGPT's, but H and its inverse are factorised undamped first, damp added after each failure."""
    W, H = W.clone().float(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    diag = torch.arange(H.shape[0])
    damp = percdamp * torch.mean(torch.diag(H))
    while True:
        try:
            decompose_H = torch.linalg.cholesky(H)
            if not torch.isnan(decompose_H).any():
                H = decompose_H
                break
            H[diag, diag] += damp
        except torch.linalg.LinAlgError:
            H[diag, diag] += damp
    H = torch.cholesky_inverse(H)
    damp = percdamp * torch.mean(torch.diag(H).abs())
    while True:
        try:
            decompose_H = torch.linalg.cholesky(H, upper=True)
            if not torch.isnan(decompose_H).any():
                H = decompose_H
                break
            H[diag, diag] += damp
        except torch.linalg.LinAlgError:
            H[diag, diag] += damp
    Hinv = H
    return _prune_column_blocks(W, Hinv, sparsity, blocksize)


@pytest.mark.parametrize("n_tokens", [400, 40])  # H positive definite; H of rank 40 < 256 columns: damped
def test_damping_on_failure_prunes_as_the_ecoflap_authors_sparsegpt(n_tokens):
    rows, cols, sparsity = 24, 256, 0.5
    dense = _layer(rows, cols, seed=2).weight.detach().clone()
    x = torch.randn(n_tokens, cols)
    pruner = make_pruner("sparsegpt", counts="reference", damping="on_failure")
    layer = _layer(rows, cols, seed=2)
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, x)
    H = stats["H"].clone()
    pruner.prune(layer, stats, sparsity, None)
    theirs = ecoflaps_sparsegpt(dense, H, sparsity)
    assert torch.equal(layer.weight == 0, theirs == 0)
    assert torch.allclose(layer.weight, theirs, atol=1e-5, rtol=1e-4)
    always = _layer(rows, cols, seed=2)
    _prune("sparsegpt", always, x, sparsity, "reference")  # damping: always, SparseGPT's own
    # a positive definite H is factorised undamped (another result); a singular one fails once and
    # gets the one damp that `always` adds
    assert torch.allclose(always.weight, theirs, atol=1e-5, rtol=1e-4) == (n_tokens < cols)
