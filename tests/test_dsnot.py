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


def test_applies_to_reads_the_layer_role():
    d = DSnoT()
    assert d.applies_to("self_attn.q_proj") and not d.applies_to("mlp.down_proj")
    assert DSnoT(skip_layers=["attention"]).applies_to("mlp.fc1")
    assert not DSnoT(skip_layers=["attention"]).applies_to("self_attn.q_proj")
    layer = nn.Linear(4, 2)
    assert d.init_stats(layer).col_sum.shape == (4,)


def _windows_one_by_one(windows: list[torch.Tensor]) -> DSnoTStats:
    stats = DSnoTStats(windows[0].shape[-1], windows[0].device)
    for w in windows:
        stats.add_batch(w.unsqueeze(0))
    return stats


def test_padded_windows_count_one_by_one_without_their_padding():
    """A stack with a mask_key hands each layer its real tokens only (BlockInput.real_positions):
    s and var must be those of the windows taken one at a time, padding never seen, however
    many windows came in the batch."""
    from ecoflap.blocks.capture import BlockInput

    torch.manual_seed(0)
    lengths = [5, 2, 4]
    windows = [torch.randn(n, 6) for n in lengths]
    padded = torch.full((3, 5, 6), 1e3)  # the padding holds values that would show
    valid = torch.zeros(3, 5, dtype=torch.bool)
    for i, w in enumerate(windows):
        padded[i, :len(w)] = w
        valid[i, :len(w)] = True
    inp = BlockInput(None, (), {}, {}, valid)
    stats = DSnoTStats(6, torch.device("cpu"))
    stats.add_batch(inp.real_positions(padded))
    one_by_one = _windows_one_by_one(windows)
    assert stats.windows == 3 and stats.tokens == sum(lengths)
    assert torch.allclose(stats.s, one_by_one.s, atol=1e-6)
    assert torch.allclose(stats.var, one_by_one.var, atol=1e-6)
    assert torch.allclose(stats.sq_sum, one_by_one.sq_sum)


@pytest.fixture(scope="module")
def tiny_t5():
    from conftest import build_tokenizer
    from test_seq2seq import build_tiny_t5

    from ecoflap.data.calibration import seq2seq_calibration
    from ecoflap.models.registry import adapter_for

    tok = build_tokenizer()
    model = build_tiny_t5(len(tok))
    data = seq2seq_calibration(tok, "austen-emma", 8, 32, 0, "ecoflap", 48)
    assert not data["attention_mask"].all()  # the encoder's windows are padded
    return model, adapter_for(model, "seq2seq_lm"), data


def test_padded_stack_masks_do_not_depend_on_the_batch_size(tiny_t5):
    """T5's encoder pads its windows: Wanda + DSnoT must give the same masks whether the
    calibration windows come one, two or eight at a time, and the encoder's masks whatever
    its padding holds. (The decoder's cross-attention k/v read the encoder's padded states,
    which the decoder's mask_key does not cover, so only the encoder is compared there.)"""
    import copy

    from ecoflap.data.calibration import batches
    from ecoflap.models.base import model_layout
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import Wanda

    base, adapter, data = tiny_t5
    ratios = {k: 0.5 for block in model_layout(base, adapter).values() for k in block}

    def prune(data, batch_size):
        model = copy.deepcopy(base)
        report = prune_sequential(model, adapter, Wanda(), ratios, batches(data, batch_size), torch.device("cpu"),
                                  refiner=DSnoT(skip_layers=[]))
        return report.mask_sha256, {k: v == 0 for k, v in model.state_dict().items() if k.startswith("encoder.block.")}

    hashes = {bs: prune(data, bs)[0] for bs in (1, 2, 8)}
    assert len(set(hashes.values())) == 1, hashes
    _hash, encoder = prune(data, 8)
    _hash, other = prune(dict(data, input_ids=data["input_ids"].where(data["attention_mask"].bool(), 7)), 8)
    assert all(torch.equal(encoder[k], other[k]) for k in encoder)


def _tiny_opt(vocab: int):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def _family(name: str):
    """(model, adapter, calibration batches, the MLP layers of a block by the family's own layout)."""
    from conftest import build_tiny_llama, build_tokenizer, calibration_batches
    from test_seq2seq import build_tiny_t5

    from ecoflap.data.calibration import batches, seq2seq_calibration
    from ecoflap.models.registry import adapter_for

    tok = build_tokenizer()
    if name == "t5":
        model = build_tiny_t5(len(tok))
        data = batches(seq2seq_calibration(tok, "austen-emma", 8, 32, 0, "ecoflap", 48), 4)
        return model, adapter_for(model, "seq2seq_lm"), data, lambda n: ".DenseReluDense." in n
    model = build_tiny_llama(len(tok), layers=2) if name == "llama" else _tiny_opt(len(tok))
    mlp = (lambda n: n.startswith("mlp.")) if name == "llama" else (lambda n: n in ("fc1", "fc2"))
    return model, adapter_for(model), calibration_batches(tok), mlp


@pytest.mark.parametrize("family", ["llama", "opt", "t5"])
def test_the_default_skips_the_mlp_of_every_family(family):
    """skip_layers: [mlp] names the block's MLP whatever the family calls it (LLaMA mlp.*, OPT
    fc1/fc2, T5 layer.N.DenseReluDense.*): on the first block (whose inputs do not depend on
    the refinement) the MLP keeps Wanda's masks and attention is refined."""
    import copy

    from ecoflap.models.base import model_layout
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import Wanda

    base, adapter, data, is_mlp = _family(family)
    for _name, block in adapter.named_blocks(base):
        layers = adapter.prunable_layers(block)
        assert {n for n in layers if not DSnoT().applies_to(n)} == {n for n in layers if is_mlp(n)} != set()
    ratios = {k: 0.5 for block in model_layout(base, adapter).values() for k in block}
    first = adapter.named_blocks(base)[0][0] + "."

    def zeros(refiner):
        model = copy.deepcopy(base)
        prune_sequential(model, adapter, Wanda(), ratios, data, torch.device("cpu"), refiner=refiner)
        return {k[len(first):]: v == 0 for k, v in model.state_dict().items() if k.startswith(first)}

    plain, refined = zeros(None), zeros(DSnoT(update_threshold=0.0))
    changed = {k.rsplit(".", 1)[0] for k in plain if not torch.equal(plain[k], refined[k])}
    assert changed and not any(is_mlp(k) for k in changed)


def test_skip_layers_names_roles_and_every_layer_needs_one():
    with pytest.raises(ValueError, match=r"skip_layers \['self_attn'\].*one of \['attention', 'mlp'\]"):
        DSnoT(skip_layers=["self_attn"])
    with pytest.raises(ValueError, match="'router.gate' matches no roles.*LAYER_ROLES.*skip_layers: \\[\\]"):
        DSnoT().applies_to("router.gate")
    assert DSnoT(skip_layers=[]).applies_to("router.gate")  # refining every layer needs no roles


def test_the_config_schema_offers_exactly_the_layer_roles():
    from ecoflap import catalog
    from ecoflap.pruning.dsnot import LAYER_ROLES

    assert set(catalog.REFINERS["dsnot"].options["skip_layers"].schema["items"]["enum"]) == set(LAYER_ROLES)
