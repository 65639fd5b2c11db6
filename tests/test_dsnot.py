"""DSnoT (refine: dsnot) on a layer worked by hand, and its one invariant on random layers
and through the engine: a layer's sparsity (per row; per group of m for N:M) never changes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ecoflap.pruning.dsnot import DSnoT, DSnoTStats, refine_nm, refine_rows
from ecoflap.pruning.masks import nm_mask, rowwise_mask


def _stats(x: torch.Tensor) -> DSnoTStats:
    stats = DSnoTStats(x.shape[-1], x.device)
    stats.add_batch(x)
    return stats


def test_hand_worked_row_lowers_the_reconstruction_error():
    """One window of two tokens, four inputs; column means (1, 1, -1, 3), so s = 2 x mean =
    (2, 2, -2, 6), every variance 0.01, squared norms (2.02, 2.02, 2.02, 18.02).
    w = (1, 0.5, 0.6, 0.2): Wanda scores |w| ||x|| = (1.42, 0.71, 0.85, 0.85); at 50 % it
    prunes columns 1 and 3, and the mean output error is e = 0.5 x 2 + 0.2 x 6 = 2.2.
    Cycle 1 (e > 0): regrow the pruned weight with the largest positive w s / var (column
    3: 120 against column 1's 100), prune the kept weight with negative w s (column 2:
    -1.2); e = 2.2 - 1.2 - 1.2 = -0.2. Cycle 2 (e < 0): the most negative pruned candidate
    would be needed, and there is none (the front of the grow order is a kept weight), so
    the row stops. Columns 1 and 2 end pruned."""
    x = torch.tensor([[[0.9, 1.1, -0.9, 2.9], [1.1, 0.9, -1.1, 3.1]]])
    stats = _stats(x)
    assert torch.allclose(stats.s, torch.tensor([2.0, 2.0, -2.0, 6.0]))
    assert torch.allclose(stats.var, torch.full((4,), 0.01), atol=1e-6)
    w = torch.tensor([[1.0, 0.5, 0.6, 0.2]])
    wanda = w.abs() * stats.sq_sum.sqrt()
    pruned = rowwise_mask(wanda, 0.5)
    assert pruned.tolist() == [[False, True, False, True]]
    weights, refined = refine_rows(w, w.masked_fill(pruned, 0), pruned, stats)
    assert refined.tolist() == [[False, True, True, False]]
    assert weights.tolist() == [[1.0, 0.0, 0.0, pytest.approx(0.2)]]
    error = ((w - weights) * stats.s).sum().item()
    assert error == pytest.approx(-0.2, abs=1e-5)
    # and on the tokens themselves: squared output error 1.13^2 + 1.07^2 = 2.4218 with
    # Wanda's mask, 0.01^2 + 0.21^2 = 0.0442 after
    dense = x[0] @ w.T
    before = (dense - x[0] @ w.masked_fill(pruned, 0).T).pow(2).sum().item()
    after = (dense - x[0] @ weights.T).pow(2).sum().item()
    assert before == pytest.approx(2.4218, abs=1e-4) and after == pytest.approx(0.0442, abs=1e-4)


def test_the_threshold_stops_a_row_that_is_already_close():
    x = torch.tensor([[[0.9, 1.1, -0.9, 2.9], [1.1, 0.9, -1.1, 3.1]]])
    stats = _stats(x)
    w = torch.tensor([[1.0, 0.5, 0.6, 0.2]])
    pruned = torch.tensor([[False, True, False, True]])
    _weights, refined = refine_rows(w, w.masked_fill(pruned, 0), pruned, stats, update_threshold=2.5)
    assert torch.equal(refined, pruned)  # |e| = 2.2 <= 2.5: nothing to do


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unstructured_refinement_keeps_every_rows_count(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 64, generator=gen) + torch.randn(64, generator=gen)  # nonzero means
    w = torch.randn(32, 64, generator=gen)
    stats = _stats(x)
    pruned = rowwise_mask(w.abs() * stats.sq_sum.sqrt(), 0.6)
    # uneven rows too, as SparseGPT leaves them: drop a few pruned weights at random
    pruned &= torch.rand(pruned.shape, generator=gen) > 0.1
    e0 = ((w.masked_fill(~pruned, 0)) * stats.s).sum(1)
    weights, refined = refine_rows(w, w.masked_fill(pruned, 0), pruned, stats, update_threshold=0.0)
    assert torch.equal(refined.sum(1), pruned.sum(1))
    assert torch.equal(weights == 0, refined | (w == 0))
    assert not torch.equal(refined, pruned)
    e1 = ((w - weights) * stats.s).sum(1)
    assert e1.abs().mean() < e0.abs().mean()  # the point of it: the mean output error shrinks


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_refinement_keeps_every_group(n, m):
    gen = torch.Generator().manual_seed(n * m)
    x = torch.randn(2, 16, 64, generator=gen) + torch.randn(64, generator=gen)
    w = torch.randn(24, 64, generator=gen)
    stats = _stats(x)
    pruned = nm_mask(w.abs() * stats.sq_sum.sqrt(), n, m)
    weights, refined = refine_nm(w, w.masked_fill(pruned, 0), pruned, stats, m, update_threshold=0.0)
    assert (refined.reshape(24, -1, m).sum(2) == n).all()
    assert torch.equal(weights == 0, refined)
    assert not torch.equal(refined, pruned)


def test_after_sparsegpt_kept_weights_keep_their_updated_values():
    """A kept weight keeps the pruner's (updated) value; a regrown one gets its dense value."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 16, generator=gen) + 1.0
    w = torch.randn(8, 16, generator=gen)
    stats = _stats(x)
    pruned = rowwise_mask(w.abs(), 0.5)
    w_updated = (w * 1.1).masked_fill(pruned, 0)  # stands in for SparseGPT's compensation
    weights, refined = refine_rows(w, w_updated, pruned, stats, update_threshold=0.0)
    still_kept, regrown = ~pruned & ~refined, pruned & ~refined
    assert regrown.any()
    assert torch.equal(weights[still_kept], w_updated[still_kept])
    assert torch.equal(weights[regrown], w[regrown])


def test_engine_refines_attention_only_by_default_and_never_moves_sparsity(tiny, calib_batches):
    from ecoflap.allocation.ratios import uniform
    from ecoflap.models.base import model_layout
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import Wanda

    model, _tok, adapter = tiny
    layers = {k: n for block in model_layout(model, adapter).values() for k, n in block.items()}
    ratios = uniform(layers, 0.6)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    def masks(refiner):
        model.load_state_dict(dense)
        report = prune_sequential(model, adapter, Wanda(), ratios, calib_batches, torch.device("cpu"),
                                  refiner=refiner)
        return report, {k: (v == 0) for k, v in model.state_dict().items() if k.endswith(".weight")}

    plain_report, plain = masks(None)
    report, refined = masks(DSnoT(update_threshold=0.0))
    assert report.layer_sparsity == plain_report.layer_sparsity
    # block 0 sees the same (dense-model) inputs either way: its MLP ("mlp" is skipped by
    # default) keeps Wanda's masks and only its attention is refined (later blocks' inputs differ)
    changed = {k for k in plain if k.startswith("model.layers.0.") and not torch.equal(plain[k], refined[k])}
    assert changed and all(".self_attn." in k for k in changed)
    all_report, every = masks(DSnoT(update_threshold=0.0, skip_layers=[]))
    assert all_report.layer_sparsity == plain_report.layer_sparsity
    assert any(".mlp." in k and not torch.equal(plain[k], every[k]) for k in plain)


def test_applies_to_reads_the_layer_prefix():
    d = DSnoT()
    assert d.applies_to("self_attn.q_proj") and not d.applies_to("mlp.down_proj")
    assert DSnoT(skip_layers=["self_attn"]).applies_to("mlp.fc1")
    layer = nn.Linear(4, 2)
    assert d.init_stats(layer).col_sum.shape == (4,)
