"""Figures that say what they show: every line of the profile plot carries its own method's
label and colour, in every panel, including when the panels differ in which methods coincide."""
from __future__ import annotations

import pandas as pd
import pytest

from ecoflap.reporting import plots
from ecoflap.reporting.plots import plot_profiles


def test_profile_lines_carry_their_own_labels(tmp_path):
    uniform = [0.5, 0.5, 0.5, 0.5]
    # in panel 0.5 magnitude/wanda/sparsegpt coincide and owl differs; in 0.6 sparsegpt has its
    # own profile too (N:M-like rounding): the set of shared lines changes between panels, which
    # is what used to shift the colour cycle against a legend drawn once
    profiles = {
        "0.5": {"magnitude": uniform, "wanda": uniform, "sparsegpt": uniform,
                "owl_wanda": [0.6, 0.55, 0.45, 0.4], "ecoflap": [0.3, 0.5, 0.6, 0.6]},
        "0.6": {"magnitude": [0.6] * 4, "wanda": [0.6] * 4, "sparsegpt": [0.61, 0.6, 0.6, 0.59],
                "owl_wanda": [0.7, 0.65, 0.55, 0.5], "ecoflap": [0.4, 0.6, 0.7, 0.7]},
    }
    drawn = plot_profiles(profiles, tmp_path / "profiles.png", "test")
    assert (tmp_path / "profiles.png").stat().st_size > 0
    colour_of_method = {}
    for panel, (label, per_method) in zip(drawn, profiles.items()):
        assert panel["title"] == f"target {label}"
        named = []
        for line in panel["lines"]:
            names = line["label"].split(", ")
            named += names
            for name in names:  # the line drawn is the profile of every method it is labelled with
                assert line["values"] == pytest.approx(per_method[name], abs=1e-4), (label, name)
            # one colour per method across panels (the colour of the line's first method)
            assert colour_of_method.setdefault(names[0], line["color"]) == line["color"], (label, names)
        assert sorted(named) == sorted(per_method), label  # every method exactly once
        # this panel's legend lists exactly its lines, each with the line's colour
        assert [(e["label"], e["color"]) for e in panel["legend"]] == \
            [(line["label"], line["color"]) for line in panel["lines"]]
    assert len(set(colour_of_method.values())) == len(colour_of_method)
    assert drawn[0]["lines"][0]["label"] == "magnitude, wanda, sparsegpt"
    assert [line["label"] for line in drawn[1]["lines"]][:2] == ["magnitude, wanda", "sparsegpt"]


def test_variant_legend_lists_the_lines_of_every_panel(tmp_path, monkeypatch):
    """ATP run with SparseGPT only: its line is in the second panel alone and still needs its
    legend entry; uniform and dense, drawn in both panels, get one entry each."""
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig))
    metric = "perplexity (x)"
    table = pd.DataFrame([{"method": m, "sparsity": str(t), "target": t, metric: v * t, f"{metric} min": v * t - 1,
                           f"{metric} max": v * t + 1}
                          for m, v in [("dense", 10), ("wanda", 100), ("sparsegpt", 90), ("atp_sparsegpt", 80)]
                          for t in (0.5, 0.6)])
    plots.plot_variants(table, [metric], {"wanda": "wanda", "sparsegpt": "sparsegpt", "atp_sparsegpt": "sparsegpt"},
                        {"wanda": "uniform", "sparsegpt": "uniform", "atp_sparsegpt": "atp"},
                        tmp_path / "variants.png", "test")
    (fig,) = saved
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["uniform", "atp", "dense"]
