"""offload: cpu on a machine without a GPU. The "device" is the CPU itself, so nothing really
moves; each block's `to` is instrumented to record where the block was sent, which checks
the schedule: a block reaches the device only while it runs or is held, at most one block
(two during a backward) is there at a time, every block is back in host memory after each
stage, and results equal those of the model placed whole. The real copies to a GPU are
checked by tools/device_check.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import calibration_batches, every_scorer, uniform_per_layer
from ecoflap.models import offload
from ecoflap.models.base import model_layout
from ecoflap.models.registry import adapter_for
from ecoflap.models.loading import load_model

CPU = torch.device("cpu")
FIX = Path(__file__).parent / "fixtures" / "vl"


class Tracker:
    """Where each block is, as far as offload's calls to `block.to` say."""

    def __init__(self, blocks):
        self.on_device: set[int] = set()
        self.most = 0
        self.visits = 0
        for i, block in enumerate(blocks):
            plain = block.to

            def to(target, *a, _i=i, _plain=plain, **k):
                if target is offload.HOST:
                    self.on_device.discard(_i)
                else:
                    self.visits += 1
                    self.on_device.add(_i)
                    self.most = max(self.most, len(self.on_device))
                return _plain(target, *a, **k)
            block.to = to


def _offloaded(tiny_dir):
    model, tok = load_model(tiny_dir, CPU, torch.float32)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    tracker = Tracker(blocks)
    offload.place_model(model, blocks, CPU, "cpu")  # force the cpu mode on the CPU "device"
    tracker.on_device.clear()
    return model, tok, adapter, tracker


def _batches(tok):
    return calibration_batches(tok)


def test_choose_offload_on_cpu(tiny, monkeypatch):
    model, _tok, _adapter = tiny
    size = offload.model_bytes(model)
    assert offload.choose_offload("cpu", size, CPU) == "none"  # host memory is the device's memory
    assert offload.choose_offload("auto", size, CPU) == "none"
    assert offload.choose_offload("disk", size, CPU) == "disk"
    monkeypatch.setattr(offload, "host_available_bytes", lambda: size)  # the model would not fit with room
    assert offload.choose_offload("auto", size, CPU) == "disk"
    with pytest.raises(ValueError, match="offload must be one of"):
        offload.choose_offload("disk-ish", size, CPU)


@pytest.mark.parametrize("pruner_name", ["wanda", "sparsegpt", "magnitude"])
def test_pruning_with_offload_visits_one_block_at_a_time(tiny_dir, pruner_name):
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    results = []
    for mode in ("none", "cpu"):
        if mode == "none":
            model, tok = load_model(tiny_dir, CPU, torch.float32)
            adapter, tracker = adapter_for(model), None
        else:
            model, tok, adapter, tracker = _offloaded(tiny_dir)
        layout = model_layout(model, adapter)
        per_layer = uniform_per_layer(layout, 0.6)
        report = prune_sequential(model, adapter, make_pruner(pruner_name), per_layer, _batches(tok), CPU)
        results.append(report.mask_sha256)
        if tracker:
            assert tracker.most == 1 and tracker.on_device == set()
            assert tracker.visits >= len(adapter.blocks(model))
    assert results[0] == results[1]


def test_scores_with_offload_equal_the_whole_model(tiny_dir):
    model, tok = load_model(tiny_dir, CPU, torch.float32)
    whole = every_scorer(model, adapter_for(model), _batches(tok))
    model, tok, adapter, tracker = _offloaded(tiny_dir)
    held = every_scorer(model, adapter, _batches(tok))
    assert held == whole  # bit-identical
    assert tracker.on_device == set()
    assert tracker.most <= 2  # a backward recomputes block j while block j+1's gradients are reduced
    # the checkpointed scorer restored the onloading forward it wrapped
    assert all("forward" in b.__dict__ for b in adapter.blocks(model))


def test_perplexity_with_offload_is_identical(tiny_dir):
    from ecoflap.evaluation.perplexity import evaluation_text, perplexity

    model, tok = load_model(tiny_dir, CPU, torch.float32)
    whole = perplexity(model, tok, evaluation_text("brown-heldout")[:20_000], 64, CPU, 8, 4)
    model, tok, _adapter, tracker = _offloaded(tiny_dir)
    held = perplexity(model, tok, evaluation_text("brown-heldout")[:20_000], 64, CPU, 8, 4)
    assert held["perplexity"] == whole["perplexity"]
    assert tracker.most == 1 and tracker.on_device == set()


def test_first_order_refuses_offload_naming_the_alternative(tiny_dir):
    from ecoflap.scoring.first_order import first_order_scores

    model, tok, adapter, _tracker = _offloaded(tiny_dir)
    with pytest.raises(ValueError, match="checkpointed"):
        first_order_scores(model, adapter, _batches(tok), CPU)


@pytest.mark.parametrize("kind", ["blip2_opt", "clip"])
def test_vision_language_pruning_with_offload(tmp_path, kind):
    """Several stacks (vision, Q-Former, language), and modules outside the blocks on every side
    (BLIP-2's query tokens and projection, CLIP's projections): the language model's inputs are
    captured through the already pruned, offloaded vision side."""
    import vl_models

    from ecoflap.cli import main
    from ecoflap.data.calibration import batches, load_calibration
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import Wanda

    folder = vl_models.build(kind, tmp_path / "model")
    main(["calibrate", "--model", str(folder), "--source", "cc3m", "--pairs", str(FIX / "cc3m/pairs.tsv"),
          "--image-root", str(FIX / "cc3m"), "--n-samples", "4", "--prompt", "a photo of",
          "--out", str(tmp_path / "calib.safetensors")])
    data = batches(load_calibration(str(tmp_path / "calib.safetensors"), None), 2)
    hashes = []
    for mode in ("none", "cpu"):
        model, _procs = load_model(folder, CPU, torch.float32)
        adapter = adapter_for(model)
        tracker = None
        if mode == "cpu":
            tracker = Tracker(adapter.blocks(model))
            offload.place_model(model, adapter.blocks(model), CPU, "cpu")
        layout = model_layout(model, adapter)
        per_layer = uniform_per_layer(layout, 0.5)
        hashes.append(prune_sequential(model, adapter, Wanda(), per_layer, data, CPU).mask_sha256)
        if tracker:
            assert tracker.most == 1 and tracker.on_device == set()
    assert hashes[0] == hashes[1]


@pytest.mark.parametrize("kind", ["llama", "blip2_opt", "clip"])
def test_gradient_scores_release_a_block_only_after_its_backward(tiny_dir, tmp_path, monkeypatch, kind):
    """A CPU stand-in for a second device: "host memory" is float64 and "the device" float32
    (the round trip is exact). A block sent back too early during the backward then fails as
    it would on a GPU: autograd meets a weight of the other dtype (device) in the block's
    remaining backward, or a gradient that does not match its parameter."""
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores

    if kind == "llama":
        folder, data = tiny_dir, _batches(load_model(tiny_dir, CPU, torch.float32)[1])
    else:
        import vl_models

        from ecoflap.cli import main
        from ecoflap.data.calibration import batches, load_calibration

        folder = vl_models.build(kind, tmp_path / "model")
        main(["calibrate", "--model", str(folder), "--source", "cc3m", "--pairs", str(FIX / "cc3m/pairs.tsv"),
              "--image-root", str(FIX / "cc3m"), "--n-samples", "4", "--prompt", "a photo of",
              "--out", str(tmp_path / "calib.safetensors")])
        data = batches(load_calibration(str(tmp_path / "calib.safetensors"), None), 2)
    model, _ = load_model(folder, CPU, torch.float32)
    adapter = adapter_for(model)
    whole = checkpointed_gradient_scores(model, adapter, data, CPU, "layer", "abs_wg")
    model, _ = load_model(folder, CPU, torch.float32)
    adapter = adapter_for(model)
    monkeypatch.setattr(offload, "HOST", torch.float64)
    offload.place_model(model, adapter.blocks(model), CPU, "cpu")
    for block in adapter.blocks(model):
        block._ecoflap_home.device = torch.float32  # "onloading" converts the block back to float32
    assert all(p.dtype == torch.float64 for b in adapter.blocks(model) for p in b.parameters())
    held = checkpointed_gradient_scores(model, adapter, data, CPU, "layer", "abs_wg")
    assert held == whole
    assert all(p.dtype == torch.float64 for b in adapter.blocks(model) for p in b.parameters())


def test_what_does_not_fit_the_device_is_named_before_loading():
    gb = 10**9
    blocks = {"model.layers.0": 1 * gb, "model.layers.1": 3 * gb}
    offload.check_fits("none", 10 * gb, 6 * gb, blocks, 12 * gb, "cuda:0")  # fits
    with pytest.raises(MemoryError, match="10.00 GB of weights do not fit the 8.00 GB free on cuda:0; set offload: cpu"):
        offload.check_fits("none", 10 * gb, 6 * gb, blocks, 8 * gb, "cuda:0")
    offload.check_fits("cpu", 10 * gb, 6 * gb, blocks, 9 * gb, "cuda:0")  # outside + largest block = 9 GB
    with pytest.raises(MemoryError, match="block model.layers.1 is 3.00 GB.*6.00 GB.*9.00 GB in all, with 8.50 GB free"):
        offload.check_fits("cpu", 10 * gb, 6 * gb, blocks, int(8.5 * gb), "cuda:0")


def test_activations_in_host_memory_give_the_same_results(tiny_dir, tmp_path, monkeypatch):
    """activations: cpu parks every batch's hidden states in host memory between blocks and
    moves each batch to the device while its block runs. On a CPU the moves are no-ops, so
    the choice is forced here: the code path runs, and masks, scores and perplexity agree."""
    from ecoflap.blocks import walk
    from ecoflap.blocks.capture import single_stack
    from ecoflap.evaluation.perplexity import evaluation_text, perplexity
    from ecoflap.pruning.checkpoint import PrunedCheckpoint
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner
    from ecoflap.scoring.zeroth_order import zeroth_order_scores

    def run(model, tok, adapter):
        layout = model_layout(model, adapter)
        per_layer = uniform_per_layer(layout, 0.5)
        zo = zeroth_order_scores(model, adapter, _batches(tok), CPU, granularity="block", reuse_block_inputs=True)
        ppl = perplexity(model, tok, evaluation_text("brown-heldout")[:20_000], 64, CPU, 8, 4, adapter)
        out = tmp_path / f"pruned{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        written = PrunedCheckpoint(model, adapter, tiny_dir, out)  # offload: disk must write what it prunes
        mask = prune_sequential(model, adapter, make_pruner("sparsegpt"), per_layer, _batches(tok), CPU,
                                on_block_pruned=written.write_block).mask_sha256
        return zo, ppl["perplexity"], mask

    model, tok = load_model(tiny_dir, CPU, torch.float32, offload="disk")
    assert not offload.park_activations(model, [torch.zeros(2, 2)], CPU, "x")  # a CPU is its own host memory
    adapter = adapter_for(model)
    device_kept = run(model, tok, adapter)
    monkeypatch.setattr(walk, "park_activations", lambda *a: True)
    model, tok = load_model(tiny_dir, CPU, torch.float32, offload="disk")
    adapter = adapter_for(model)
    steps = list(walk.walk_stack(model, adapter, single_stack(model, adapter, "test"), _batches(tok), CPU, None))
    assert all(inp.device == CPU for step in steps for inp in step.inputs)
    assert run(model, tok, adapter) == device_kept
    with pytest.raises(ValueError, match="activations must be one of"):
        offload.set_activation_place(model, "gpu")
