"""AlphaPruning (scorer esd_alpha + allocation alphapruning) on hand-worked cases: the Hill
formula, a matrix whose spectrum is a known power law, and the authors' own LLaMA-7B
numbers for the mapping."""
from __future__ import annotations

import json

import pytest
import torch

from ecoflap.allocation.allocators import alphapruning
from ecoflap.allocation.plan import plan_allocation
from ecoflap.cli import main
from ecoflap.scoring.esd_alpha import esd_alpha_scores, hill_alpha, matrix_alpha


def test_hill_formula_by_hand():
    eigs = torch.tensor([0.0, 1.0, 2.0, 3.0]).exp()  # ln = 0, 1, 2, 3
    assert hill_alpha(eigs, 0) == pytest.approx(1 + 4 / 6)  # xmin = 1: sum ln(x / 1) = 6 over 4 values
    assert hill_alpha(eigs, 1) == pytest.approx(1 + 3 / 3)  # xmin = e: (1 + 2 + 3) - 3 x 1 = 3 over 3 values


@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.0])
def test_a_power_law_spectrum_gives_its_exponent(alpha):
    """W = U diag(sqrt(lambda)) V^T with lambda the quantiles of a Pareto law of density
    ~ lambda^-alpha: the fitted exponent is alpha (within 1 %), whatever the rotations."""
    n = 256
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    lam = (1 - q) ** (-1 / (alpha - 1))
    gen = torch.Generator().manual_seed(int(alpha * 10))
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    w = u @ torch.diag(lam.sqrt()) @ v.T
    assert matrix_alpha(w) == pytest.approx(alpha, rel=0.01)
    assert matrix_alpha(w, "xmin_mid") == pytest.approx(alpha, rel=0.01)
    assert matrix_alpha(3.0 * w) == pytest.approx(matrix_alpha(w), rel=1e-4)  # scale-free


# LLaMA-7B, Wanda, epsilon 0.2, target 0.7: the block means of the authors' shipped
# data/llama-7b-hf/alpha_peak.npy (haiquanlu/AlphaPruning 5f0e984, rounded to 3 decimals) and
# the block sparsities their ww_sparsity gives for them (4 decimals; scale factor 0.710043)
LLAMA7B_ALPHA = [2.622, 2.890, 2.969, 2.964, 3.090, 3.064, 2.961, 2.746, 2.775, 2.609, 2.717, 2.730, 2.784, 2.852,
                 2.897, 3.177, 3.123, 3.446, 3.872, 3.606, 3.894, 4.066, 3.755, 3.715, 3.994, 4.220, 4.102, 4.160,
                 3.851, 4.093, 4.160, 3.537]
LLAMA7B_SPARSITY = [0.5704, 0.6176, 0.6315, 0.6307, 0.6529, 0.6483, 0.6301, 0.5922, 0.5974, 0.5680, 0.5871, 0.5894,
                    0.5990, 0.6109, 0.6188, 0.6681, 0.6587, 0.7156, 0.7906, 0.7438, 0.7946, 0.8248, 0.7701, 0.7629,
                    0.8122, 0.8521, 0.8313, 0.8415, 0.7869, 0.8297, 0.8414, 0.7317]


def test_the_mapping_reproduces_the_authors_llama7b_ratios():
    blocks = [f"model.layers.{i}" for i in range(32)]
    sizes = {b: 202_383_360 for b in blocks}  # equal blocks, as in LLaMA-7B
    out = alphapruning(dict(zip(blocks, LLAMA7B_ALPHA)), sizes, 0.7, epsilon=0.2)
    assert [out[b] for b in blocks] == pytest.approx(LLAMA7B_SPARSITY, abs=5e-4)  # inputs rounded to 3 decimals
    assert sum(out.values()) / 32 == pytest.approx(0.7, abs=1e-12)


def test_the_mapping_weights_by_size_and_refuses_ratios_above_one():
    sizes = {"a": 100, "b": 300}
    out = alphapruning({"a": 2.0, "b": 4.0}, sizes, 0.5, epsilon=0.2)
    assert out["b"] > out["a"]  # the larger alpha (less trained) is pruned more
    assert (out["a"] * 100 + out["b"] * 300) / 400 == pytest.approx(0.5, abs=1e-12)
    assert out["b"] / out["a"] == pytest.approx(1.2 / 0.8)
    assert alphapruning({"a": 3.0, "b": 3.0}, sizes, 0.5) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="epsilon"):
        alphapruning({"a": 2.0, "b": 4.0}, {"a": 900, "b": 100}, 0.9, epsilon=0.3)


def test_score_and_allocate_through_the_cli(tiny_dir, tmp_path):
    """Registered in the catalog like every method: the CLI scores with esd_alpha (no
    calibration data used) and the plan allocates at the exact target."""
    from transformers import AutoTokenizer

    from ecoflap.data.calibration import build_calibration, save_calibration

    calib = tmp_path / "calib.safetensors"
    save_calibration(calib, build_calibration(AutoTokenizer.from_pretrained(tiny_dir), "austen-emma", 2, 16, 0),
                     {"source": "austen-emma"})
    scores_path = tmp_path / "alpha.json"
    main(["--threads", "1", "score", "--model", str(tiny_dir), "--calibration", str(calib), "--device", "cpu",
          "--spec", json.dumps({"kind": "esd_alpha"}), "--out", str(scores_path)])
    scored = json.loads(scores_path.read_text())
    assert scored["kind"] == "esd_alpha" and len(scored["scores"]) == 3 and all(v > 1 for v in scored["scores"].values())
    layout = tmp_path / "layout.json"
    main(["download", "--spec", json.dumps({"source": "local", "path": str(tiny_dir), "family": "causal_lm"}),
          "--out", str(tmp_path / "model"), "--layout", str(layout)])
    out = tmp_path / "allocation.json"
    main(["allocate", "--layout", str(layout), "--scores", str(scores_path), "--target", "0.5",
          "--spec", json.dumps({"allocation": "alphapruning", "epsilon": 0.2}), "--out", str(out)])
    plan = json.loads(out.read_text())
    assert plan["planned_global_sparsity"] == pytest.approx(0.5, abs=1e-9)
    by_alpha = sorted(scored["scores"], key=scored["scores"].get)
    assert [plan["unit_sparsity"][b] for b in by_alpha] == sorted(plan["unit_sparsity"].values())
    laid_out = json.loads(layout.read_text())
    again = plan_allocation(laid_out, scored, {"allocation": "alphapruning", "epsilon": 0.2}, 0.5)
    assert again["layer_sparsity"] == plan["layer_sparsity"]


def test_a_rank_deficient_matrix_is_named(tiny):
    """A zero eigenvalue (a pruned model, zeroed columns) failed inside torch.histc with a range of
    [-inf, ...] and no layer named."""
    model, _tok, adapter = tiny
    block = adapter.blocks(model)[1]
    name, layer = next(iter(adapter.prunable_layers(block).items()))
    with torch.no_grad():
        layer.weight[:, :3] = 0
    with pytest.raises(ValueError, match=rf"esd_alpha of model\.layers\.1\.{name}: [0-9]+ of the 32 eigenvalues are 0"):
        esd_alpha_scores(model, adapter, [], torch.device("cpu"))
