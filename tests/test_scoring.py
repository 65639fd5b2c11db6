import copy
import json

import pytest
import torch

from ecoflap.cli import main

from ecoflap.scoring.first_order import first_order_scores
from ecoflap.scoring.outliers import outlier_ratios
from ecoflap.scoring.units import scoring_units
from ecoflap.scoring.units import direction
from ecoflap.scoring.zeroth_order import zeroth_order_scores

CPU = torch.device("cpu")


def _model64(model):
    return model.double()


def test_zeroth_order_matches_directional_derivative(tiny, calib_batches):
    """|(L(W+eps z) - L(W-eps z)) / 2eps| equals |z . grad L| for the same z (float64)."""
    model, _tok, adapter = tiny
    model = _model64(model)
    batch = calib_batches[:1]
    scores = zeroth_order_scores(model, adapter, batch, CPU, eps=1e-4, granularity="block", seed=3)
    units = scoring_units(model, adapter, "block")
    for p in model.parameters():
        p.requires_grad_(False)
    for w in (w for u in units for w in u.weights):
        w.requires_grad_(True)
    adapter.loss(model, batch[0]).backward()
    for ui, unit in enumerate(units):
        exact = sum((direction(w.shape, 3, 0, ui, ti, CPU).double() * w.grad).sum() for ti, w in enumerate(unit.weights))
        assert scores[unit.name] == pytest.approx(abs(exact.item()), rel=1e-3)


def test_block_input_reuse_gives_the_same_scores(tiny, calib_batches):
    model, _tok, adapter = tiny
    model = _model64(model)
    slow = zeroth_order_scores(model, adapter, calib_batches, CPU, granularity="layer", reuse_block_inputs=False)
    fast = zeroth_order_scores(model, adapter, calib_batches, CPU, granularity="layer", reuse_block_inputs=True)
    assert slow.keys() == fast.keys() and len(slow) == 21
    for k in slow:
        assert fast[k] == pytest.approx(slow[k], rel=1e-6)


def test_zeroth_order_is_repeatable_and_restores_weights(tiny, calib_batches):
    model, _tok, adapter = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = zeroth_order_scores(model, adapter, calib_batches, CPU, granularity="block", reuse_block_inputs=True)
    b = zeroth_order_scores(model, adapter, calib_batches, CPU, granularity="block", reuse_block_inputs=True)
    assert a == b
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    c = zeroth_order_scores(model, adapter, calib_batches, CPU, granularity="block", reuse_block_inputs=True, seed=1)
    assert a != c


def test_zeroth_order_refuses_bfloat16_and_auto_loads_float32(tiny, tiny_dir, calib_batches, tmp_path, caplog):
    """In bfloat16, W + eps z rounds back to W for 4-10 % of the weights and the scores came out up to
    24 % off the exact |z . g| (dtype auto is bf16 on a GPU): refused; auto loads float32 instead."""
    model, _tok, adapter = tiny
    with pytest.raises(ValueError, match="need more precision than bfloat16"):
        zeroth_order_scores(copy.deepcopy(model).to(torch.bfloat16), adapter, calib_batches[:1], CPU)
    assert zeroth_order_scores(copy.deepcopy(model).to(torch.float16), adapter, calib_batches[:1], CPU)  # 11 bits: within 2 %

    calib = tmp_path / "calib.safetensors"
    main(["calibrate", "--model", str(tiny_dir), "--n-samples", "2", "--seq-len", "16", "--out", str(calib)])
    args = ["score", "--model", str(tiny_dir), "--calibration", str(calib), "--device", "cpu",
            "--spec", json.dumps({"kind": "zeroth_order"})]
    with pytest.raises(SystemExit):
        main([*args, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16.json")])
    assert "need more precision than bfloat16" in caplog.text and not (tmp_path / "bf16.json").exists()
    main([*args, "--out", str(tmp_path / "zo.json")])
    assert json.loads((tmp_path / "zo.json").read_text())["provenance"]["config"]["dtype"] == "float32"


def test_first_order_matches_manual_gradients(tiny, calib_batches):
    model, _tok, adapter = tiny
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    scores = first_order_scores(model, adapter, calib_batches, CPU, granularity="layer", reduce="abs_g")
    assert [p.requires_grad for p in model.parameters()] == flags  # restored as they were
    assert all(p.grad is None for p in model.parameters())
    name = "model.layers.1.mlp.up_proj"
    w = adapter.blocks(model)[1].mlp.up_proj.weight
    expected = 0.0
    for ids in calib_batches:
        w.requires_grad_(True)
        (g,) = torch.autograd.grad(adapter.loss(model, ids), w)
        expected += g.abs().sum().item()
    assert scores[name] == pytest.approx(expected, rel=1e-4)


def test_outlier_ratios_are_percentages(tiny, calib_batches):
    model, _tok, adapter = tiny
    r = outlier_ratios(model, adapter, calib_batches, CPU, m=2.0)
    assert list(r) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(0 < v < 100 for v in r.values())
    assert outlier_ratios(model, adapter, calib_batches, CPU, m=1000.0) == {k: 0.0 for k in r}


def test_checkpointed_projection_equals_zeroth_order(tiny, calib_batches):
    """The inference-memory gradient path reproduces the paper's estimator (eps -> 0)."""
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores

    model, _tok, adapter = tiny
    model = _model64(model)
    # eps trades truncation error (eps^2) against rounding (RMSNorm and RoPE compute in fp32)
    zo = zeroth_order_scores(model, adapter, calib_batches, CPU, eps=1e-4, granularity="layer",
                             reuse_block_inputs=True, seed=7)
    exact = checkpointed_gradient_scores(model, adapter, calib_batches, CPU, granularity="layer",
                                         reduce="projection", seed=7)
    for k in zo:
        assert exact[k] == pytest.approx(zo[k], rel=1e-3, abs=1e-5)


def test_checkpointed_first_order_equals_full_backward(tiny, calib_batches):
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores

    model, _tok, adapter = tiny
    model = _model64(model)
    full = first_order_scores(model, adapter, calib_batches, CPU, granularity="block", reduce="abs_wg")
    ckpt = checkpointed_gradient_scores(model, adapter, calib_batches, CPU, granularity="block", reduce="abs_wg")
    for k in full:
        assert ckpt[k] == pytest.approx(full[k], rel=1e-9)


def test_outlier_ratios_refuse_a_non_finite_activation_in_a_later_batch(tiny, calib_batches):
    """An overflow in one calibration batch (not the first, which the block walk checks) made the
    block's mean NaN; nothing compares above NaN, so every share came out 0 % and OWL planned the
    uniform target with no error."""
    model, _tok, adapter = tiny
    first = set(calib_batches[0]["input_ids"].flatten().tolist())
    token = sorted(set(calib_batches[1]["input_ids"].flatten().tolist()) - first)[0]
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("inf")
    # the block walk now checks every batch's states as they enter block 0; the metric's own check stays
    with pytest.raises(FloatingPointError, match=r"non-finite values in (model.layers.0 inputs|OWL outlier metric)"):
        outlier_ratios(model, adapter, calib_batches, CPU, m=2.0)


def test_first_order_counts_a_weight_the_loss_never_reaches_as_zero(tmp_path):
    """LLaVA reads the vision tower at vision_feature_layer -2, so its last block gets no .grad: the
    first-order scorer stopped with AttributeError where the checkpointed one scores it 0."""
    import chat_vlm_models as C
    from ecoflap.data.files import open_image
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores
    from conftest import REPO

    model, procs = load_model(C.build("llava", tmp_path / "llava"), CPU, torch.float32)
    adapter = adapter_for(model)
    images = [open_image(p) for p in sorted((REPO / "tests/fixtures/vl").rglob("*.jpg"))[:2]]
    batch = adapter.calibration_batch(model, procs, images, ["a red house", "two cats"], "")
    full = first_order_scores(model, adapter, [batch], CPU, reduce="abs_wg")
    ckpt = checkpointed_gradient_scores(model, adapter, [batch], CPU, reduce="abs_wg")
    assert full["model.vision_tower.encoder.layers.1"] == 0.0
    assert full == pytest.approx(ckpt, rel=1e-6)
