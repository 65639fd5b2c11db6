import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import uniform_per_layer
from ecoflap.allocation import ratios
from ecoflap.models.base import model_layout
from ecoflap.blocks.capture import capture_stack_inputs, run_block
from ecoflap.pruning.engine import prune_sequential
from ecoflap.pruning.masks import nm_mask
from ecoflap.pruning.methods import SparseGPT, Wanda, make_pruner

CPU = torch.device("cpu")


def uniform_layers(model, adapter, target):
    layout = model_layout(model, adapter)
    return uniform_per_layer(layout, target)


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_hits_target(tiny, calib_batches, pruner):
    model, _tok, adapter = tiny
    report = prune_sequential(model, adapter, make_pruner(pruner), uniform_layers(model, adapter, 0.5),
                              calib_batches, CPU)
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)
    assert len(report.layer_sparsity) == 3 * 7
    for layer in adapter.prunable_layers(adapter.blocks(model)[0]).values():
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_patterns_are_valid(tiny, calib_batches, pruner, nm):
    model, _tok, adapter = tiny
    prune_sequential(model, adapter, make_pruner(pruner), uniform_layers(model, adapter, 0.5), calib_batches, CPU, nm)
    n, m = nm
    for block in adapter.blocks(model):
        for layer in adapter.prunable_layers(block).values():
            zeros = (layer.weight == 0).reshape(layer.weight.shape[0], -1, m).sum(-1)
            assert (zeros >= n).all()  # at least n of every m (an original zero may add one)
            assert zeros.float().mean().item() == pytest.approx(n, abs=0.05)


def test_per_layer_ratios_are_applied(tiny, calib_batches):
    model, _tok, adapter = tiny
    layout = model_layout(model, adapter)
    per_block = {b: s for b, s in zip(layout, (0.2, 0.5, 0.8))}
    report = prune_sequential(model, adapter, make_pruner("wanda"), ratios.expand_to_layers(per_block, layout),
                              calib_batches, CPU)
    for block, target in per_block.items():
        for layer in layout[block]:
            assert report.layer_sparsity[layer] == pytest.approx(target, abs=0.02)


def test_engine_feeds_pruned_outputs_forward(tiny, calib_batches):
    """Block 1's statistics must come from the outputs of the already pruned block 0."""
    model, _tok, adapter = tiny
    blocks = adapter.blocks(model)
    seen = []
    first_linear = next(iter(adapter.prunable_layers(blocks[1]).values()))
    handle = blocks[1].register_forward_pre_hook(lambda _m, args, kwargs: seen.append(args[0].clone()),
                                                 with_kwargs=True)
    dense_inputs = capture_stack_inputs(model, adapter, adapter.stacks(model)[0], calib_batches, CPU)[0]
    dense_out = run_block(blocks[0], dense_inputs[0]).clone()
    seen.clear()
    prune_sequential(model, adapter, make_pruner("wanda"), uniform_layers(model, adapter, 0.5), calib_batches, CPU)
    handle.remove()
    pruned_out = run_block(blocks[0], dense_inputs[0])  # block 0 is pruned now
    assert first_linear is not None
    assert torch.allclose(seen[0], pruned_out, atol=1e-5)
    assert not torch.allclose(seen[0], dense_out, atol=1e-3)


def _layer_error(pruner, layer, x, sparsity):
    w0 = layer.weight.detach().clone()
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, x)
    pruner.prune(layer, stats, sparsity, None)
    err = (x @ layer.weight.t() - x @ w0.t()).pow(2).sum().item()
    layer.weight.data.copy_(w0)
    return err


def test_sparsegpt_reconstructs_better_than_wanda():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs: where OBS updates pay
    assert _layer_error(SparseGPT(block_size=16), layer, x, 0.5) < 0.8 * _layer_error(Wanda(), layer, x, 0.5)


def test_sparsegpt_nm_mask_valid():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    pruner = SparseGPT(block_size=8)
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, torch.randn(64, 16))
    mask = pruner.prune(layer, stats, 0.5, (2, 4))
    assert torch.equal(mask.reshape(8, 4, 4).sum(-1), torch.full((8, 4), 2))
    assert (layer.weight[mask] == 0).all()


def test_pruned_checkpoint_reloads(tiny, calib_batches, tmp_path):
    model, tok, adapter = tiny
    prune_sequential(model, adapter, make_pruner("wanda"), uniform_layers(model, adapter, 0.6), calib_batches, CPU)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    w = adapter.blocks(again)[0].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=0.02)
    ids = calib_batches[0]["input_ids"]
    assert torch.allclose(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_wanda_prefers_high_activation_columns():
    layer = torch.nn.Linear(4, 1, bias=False)
    layer.weight.data = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    pruner = Wanda()
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, torch.tensor([[10.0, 0.1, 0.1, 1.0]]))
    mask = pruner.prune(layer, stats, 0.5, None)
    # scores 10, 0.1, 0.2, 2 -> the two middle columns go (magnitude alone would drop the first two)
    assert mask.tolist() == [[False, True, True, False]]
    assert torch.equal(nm_mask(torch.tensor([[10.0, 0.1, 0.2, 2.0]]), 2, 4), mask)


def _layer_inputs(step, layers, keep_outputs=False):
    from ecoflap.blocks.walk import feed_layers

    got = {name: [] for name in layers}
    seen = feed_layers(step, layers, lambda name, x: got[name].append(x.clone()), keep_outputs=keep_outputs)
    return got, seen


def _calls(block):
    """Count how many Linear layers of `block` actually multiply (forward hooks fire after)."""
    counter = {"n": 0}
    handles = [m.register_forward_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1))
               for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return counter, handles


def test_statistics_pass_stops_after_the_last_layer_with_the_same_inputs(tiny, calib_batches):
    """Without keep_outputs, inputs after the first stop once the block's last layer has its
    input: every layer still gets exactly what a full pass gives it, and the last layer (and
    the block's output) is not computed."""
    from ecoflap.blocks.walk import walk_stack

    model, _tok, adapter = tiny
    stack = adapter.stacks(model)[0]
    step = next(walk_stack(model, adapter, stack, calib_batches, CPU, desc=None))
    layers = adapter.prunable_layers(step.block)
    counter, handles = _calls(step.block)
    stopped, seen = _layer_inputs(step, layers)
    multiplied_stopped = counter["n"]
    counter["n"] = 0
    full, _ = _layer_inputs(step, layers, keep_outputs=True)
    for h in handles:
        h.remove()
    assert len(calib_batches) >= 2
    assert set(seen.values()) == {len(calib_batches)}
    for name in layers:
        assert len(stopped[name]) == len(full[name])
        for a, b in zip(stopped[name], full[name]):
            assert torch.equal(a, b), name
    # the first input runs whole (it shows the order); each later one skips the last layer
    assert multiplied_stopped == counter["n"] - (len(calib_batches) - 1)


def test_statistics_pass_runs_to_the_end_when_a_layer_runs_twice(tiny, calib_batches):
    """A block that calls one of its layers twice per forward is never cut short: stopping
    after the 'last' layer would lose the second call's input."""
    from ecoflap.blocks.walk import walk_stack

    model, _tok, adapter = tiny
    stack = adapter.stacks(model)[0]
    step = next(walk_stack(model, adapter, stack, calib_batches, CPU, desc=None))
    layers = adapter.prunable_layers(step.block)
    mlp = step.block.mlp
    original = type(mlp).forward

    def twice(self, x):  # the MLP runs all three of its layers a second time
        out = original(self, x)
        self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out

    mlp.forward = twice.__get__(mlp)
    try:
        got, seen = _layer_inputs(step, layers)
    finally:
        del mlp.forward
    assert seen["mlp.down_proj"] == 2 * len(calib_batches)
    assert len(got["mlp.down_proj"]) == 2 * len(calib_batches)


def _sparsegpt_on_dead_inputs(sparsity, group="row"):
    """SparseGPT on a layer whose inputs 3 and 7 are never active (a ReLU unit that never
    fires): their columns have an all-zero Hessian diagonal. Returns (dense weights, layer, mask)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4, bias=False)
    dense = layer.weight.detach().clone()
    x = torch.randn(2, 8, 16)
    x[..., [3, 7]] = 0
    pruner = SparseGPT()
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, x)
    return dense, layer, pruner.prune(layer, stats, sparsity, None, group)


def test_sparsegpt_leaves_a_layer_at_sparsity_0_as_it_is():
    """A layer the allocation keeps dense (dense_blocks, a ratio of 0) is not touched, not even
    the weights of inputs that never fire (which a pruned layer zeroes, as the reference code)."""
    dense, layer, mask = _sparsegpt_on_dead_inputs(0.0)
    assert not mask.any()
    assert torch.equal(layer.weight, dense)


def test_sparsegpt_mask_holds_the_dead_input_zeros():
    """At 10 % (6 of 64 weights by saliency) the 8 dead-input weights are zeroed too: the mask,
    whose hash the report records, must say so."""
    _dense, layer, mask = _sparsegpt_on_dead_inputs(0.1)
    assert mask[:, [3, 7]].all()
    assert torch.equal(mask, layer.weight == 0)


def test_sparsegpt_checks_the_comparison_group_as_wanda_does(caplog):
    with pytest.raises(ValueError, match=r"comparison group must be one of \('row', 'matrix'\), got 'bogus'"):
        _sparsegpt_on_dead_inputs(0.5, "bogus")
    with caplog.at_level("WARNING"):  # a valid group of the shared pruning: entry is said to have no effect
        _dense, _layer, as_matrix = _sparsegpt_on_dead_inputs(0.5, "matrix")
    assert "SparseGPT ignores comparison group 'matrix'" in caplog.text
    assert torch.equal(as_matrix, _sparsegpt_on_dead_inputs(0.5)[2])


def test_a_comparison_group_for_a_tower_the_model_lacks_is_an_error(tiny, calib_batches):
    """A group for a sub-model the model has not would set nothing (every layer compared per row)."""
    model, _tok, adapter = tiny
    with pytest.raises(ValueError, match=r"comparison names vision, not a sub-model of this causal_lm model "
                                         r"\(allowed: language\)"):
        prune_sequential(model, adapter, make_pruner("wanda"), uniform_layers(model, adapter, 0.5), calib_batches, CPU,
                         comparison={"vision": "matrix"})


def test_sparsegpt_nm_errors_name_the_width_at_fault():
    """A column block must hold whole groups of M: the error is about block_size, not the slice."""
    layer = torch.nn.Linear(16, 4, bias=False)
    pruner = SparseGPT(block_size=6)
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"block_size \(6\) must be a multiple of M \(4\)"):
        pruner.prune(layer, stats, 0.5, (2, 4))
    layer = torch.nn.Linear(18, 4, bias=False)
    stats = pruner.init_stats(layer)
    pruner.add_batch(stats, torch.randn(8, 18))
    with pytest.raises(ValueError, match=r"input dimension \(18\) to be a multiple of 4"):
        pruner.prune(layer, stats, 0.5, (2, 4))



def test_a_non_finite_input_in_a_later_batch_stops_pruning_before_any_statistics(tiny, calib_batches):
    """The walk checked the first batch's states only: an overflow in another batch reached the
    pruners' statistics (Wanda's norms NaN, every comparison false) without an error."""
    model, _tok, adapter = tiny
    first = set(calib_batches[0]["input_ids"].flatten().tolist())
    token = sorted(set(calib_batches[1]["input_ids"].flatten().tolist()) - first)[0]
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("inf")
    seen = []
    pruner = make_pruner("wanda")
    add_batch = pruner.add_batch
    pruner.add_batch = lambda stats, x: (seen.append(x), add_batch(stats, x))
    with pytest.raises(FloatingPointError, match=r"non-finite values in model.layers.0 inputs"):
        prune_sequential(model, adapter, pruner, uniform_layers(model, adapter, 0.5), calib_batches, CPU)
    assert not seen  # stopped before block 0's statistics took anything
