"""ATP (scorer atp_search + allocation atp): the arithmetic progression and its legal range
against their main.py's formula, their grid, and the search on a tiny model (the chosen
step is the grid's lowest loss; the dense weights come back after every run)."""
from __future__ import annotations

import json

import pytest
import torch

from ecoflap.allocation.allocators import atp, atp_max_step
from ecoflap.allocation.plan import plan_allocation
from ecoflap.cli import main
from ecoflap.scoring.atp_search import atp_search_scores, block_depths, step_grid


def _blocks(n: int) -> tuple[dict[str, float], dict[str, int]]:
    return {f"b{i}": i - (n - 1) / 2 for i in range(n)}, {f"b{i}": 100 for i in range(n)}


def test_progression_is_their_formula():
    """main.py: first = S - step (L - 1) / 2, rate_i = first + i step."""
    depths, sizes = _blocks(4)
    out = atp(depths, sizes, 0.5, step=0.1)
    assert [out[f"b{i}"] for i in range(4)] == pytest.approx([0.35, 0.45, 0.55, 0.65])
    raw = {f"b{i}": float(i) for i in range(4)}  # uncentred depths give the same (centred by size)
    assert atp(raw, sizes, 0.5, step=0.1) == pytest.approx(out)


def test_legal_range_and_grid_match_their_search():
    """LLaMA-2-7B (32 blocks) at 0.7: their bound min(2S, 2(1 - S)) / (L - 1) = 0.6 / 31,
    and search.sh's grid 0.002 ... 0.018 (nine legal runs)."""
    depths, sizes = _blocks(32)
    assert atp_max_step(depths, sizes, 0.7) == pytest.approx(0.6 / 31)
    assert atp_max_step(depths, sizes, 0.3) == pytest.approx(0.6 / 31)
    assert step_grid(0.002, 0.6 / 31) == pytest.approx([0.002 * k for k in range(1, 10)])
    out = atp(depths, sizes, 0.7, step=0.018)
    assert max(out.values()) == pytest.approx(0.7 + 0.018 * 15.5) and min(out.values()) == pytest.approx(0.421)
    with pytest.raises(ValueError, match="must stay below 0.0193"):
        atp(depths, sizes, 0.7, step=0.02)
    with pytest.raises(ValueError, match="must stay below"):  # their bound itself: the last block at 100 %
        atp(depths, sizes, 0.7, step=0.6 / 31)
    assert step_grid(0.1, 0.3) == pytest.approx([0.1, 0.2])  # the bound is left out
    with pytest.raises(ValueError, match="needs a step"):
        atp(depths, sizes, 0.7)


def test_plan_takes_the_searched_step_unless_the_method_sets_one():
    depths, sizes = _blocks(4)
    laid_out = {"layout": {b: {f"{b}.fc": n} for b, n in sizes.items()}}
    scored = {"scores": depths, "granularity": "block", "record": {"chosen": {"0.5": {"step": 0.1}}}}
    plan = plan_allocation(laid_out, scored, {"allocation": "atp"}, 0.5)
    assert plan["options"]["step"] == 0.1 and plan["unit_sparsity"]["b3"] == pytest.approx(0.65)
    fixed = plan_allocation(laid_out, scored, {"allocation": "atp", "step": 0.0}, 0.5)
    assert set(fixed["unit_sparsity"].values()) == {0.5}
    with pytest.raises(ValueError, match="needs a step"):  # no search at this target
        plan_allocation(laid_out, scored, {"allocation": "atp"}, 0.6)


def test_search_on_a_tiny_model(tiny, calib_batches):
    model, _tok, adapter = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    depths, record = atp_search_scores(model, adapter, calib_batches, torch.device("cpu"), [0.5, 0.7], step=0.1)
    assert depths == block_depths(model, adapter) == {"model.layers.0": 0.0, "model.layers.1": 1.0,
                                                      "model.layers.2": 2.0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # dense weights restored
    at5 = record["targets"]["0.5"]
    assert [g["step"] for g in at5["grid"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # below the bound 0.5 / 1
    assert at5["runs"] == 4 and record["runs"] == 4 + 2  # at 0.7 the bound is 0.3
    best = min(at5["grid"], key=lambda g: g["loss"])
    assert at5["chosen_step"] == best["step"] == record["chosen"]["0.5"]["step"]
    assert len({round(g["loss"], 6) for g in at5["grid"]}) > 1  # the steps are told apart
    assert record["dense_loss"] == pytest.approx(atp_dense_loss(model, adapter, calib_batches))


def atp_dense_loss(model, adapter, batches):
    from ecoflap.scoring.atp_search import calibration_loss

    return calibration_loss(model, adapter, batches, torch.device("cpu"))


def test_score_cli_needs_the_targets_and_records_the_search(tiny_dir, tmp_path, caplog):
    calib = tmp_path / "calib.safetensors"
    main(["calibrate", "--model", str(tiny_dir), "--n-samples", "4", "--seq-len", "32", "--out", str(calib)])
    out = tmp_path / "atp.json"
    args = ["score", "--model", str(tiny_dir), "--calibration", str(calib), "--spec",
            json.dumps({"kind": "atp_search", "step": 0.2}), "--out", str(out)]
    with pytest.raises(SystemExit):
        main(args)
    assert "pass --targets" in caplog.text
    main([*args, "--targets", "0.5"])
    scored = json.loads(out.read_text())
    assert scored["record"]["chosen"]["0.5"]["step"] in (0.2, 0.4)  # 0.6 would reach 0.5 + 0.6 x 1 > 1
    assert scored["provenance"]["config"]["targets"] == [0.5]


def test_a_searched_step_is_not_applied_to_a_narrower_method():
    """The search prunes every block of every sub-model under one budget; a method pruning only the
    language model (or one budget per tower, or with dense blocks) took that slope silently."""
    layout = {f"{p}.{i}": {f"{p}.{i}.fc": 100} for p in ("v", "l") for i in range(3)}
    laid_out = {"layout": layout, "submodel_of_block": {b: "vision" if b[0] == "v" else "language" for b in layout}}
    scored = {"kind": "atp_search", "granularity": "block", "scores": {b: float(b[-1]) for b in layout},
              "record": {"chosen": {"0.5": {"step": 0.1}}}}
    assert plan_allocation(laid_out, scored, {"allocation": "atp"}, 0.5)["options"]["step"] == 0.1
    for narrower in ({"submodels": ["language"]}, {"scope": "submodel"}, {"dense_blocks": ["l.2"]}):
        with pytest.raises(ValueError, match="set step in the method"):
            plan_allocation(laid_out, scored, {"allocation": "atp", **narrower}, 0.5)
        fixed = plan_allocation(laid_out, scored, {"allocation": "atp", "step": 0.05, **narrower}, 0.5)
        assert fixed["options"]["step"] == 0.05


def test_a_nan_loss_is_never_the_chosen_step(tiny, calib_batches, monkeypatch):
    """min() over the grid kept a NaN in first place (nothing compares below it): a step whose pruned
    run overflowed was chosen over every finite one."""
    import math

    import ecoflap.scoring.atp_search as search

    model, _tok, adapter = tiny
    real, calls = search.calibration_loss, []

    def first_run_overflows(*args):
        calls.append(1)
        return math.nan if len(calls) == 2 else real(*args)  # call 1: the dense model; 2: step 0.1

    monkeypatch.setattr(search, "calibration_loss", first_run_overflows)
    _, record = atp_search_scores(model, adapter, calib_batches, torch.device("cpu"), [0.5], step=0.1)
    grid = record["targets"]["0.5"]["grid"]
    assert math.isnan(grid[0]["loss"])
    assert record["chosen"]["0.5"]["step"] == min(grid[1:], key=lambda g: g["loss"])["step"] != 0.1
    monkeypatch.setattr(search, "calibration_loss", lambda *a: math.nan)
    with pytest.raises(FloatingPointError, match="every step's calibration loss is non-finite"):
        atp_search_scores(model, adapter, calib_batches, torch.device("cpu"), [0.5], step=0.1)
