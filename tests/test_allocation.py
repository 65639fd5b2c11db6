import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoflap.allocation import ratios


def test_ecoflap_hand_worked_proportional_share():
    # budget 150 of 300; floors (1 - 0.6) * 100 = 40 each; 30 left shared 1:1:2 -> 7.5, 7.5, 15;
    # the one weight lost to rounding goes to the first of the tied largest fractions
    keep = ratios.ecoflap_keep_counts({"a": 1, "b": 1, "c": 2}, {"a": 100, "b": 100, "c": 100}, 0.5, 0.6)
    assert keep == {"a": 48, "b": 47, "c": 55}


def test_ecoflap_cap_is_redistributed():
    # floors 10 each, 120 left; c alone has score but can take only 90 -> 30 more go to a and b,
    # which have no score, so they split it by free capacity
    keep = ratios.ecoflap_keep_counts({"a": 0, "b": 0, "c": 100}, {"a": 100, "b": 100, "c": 100}, 0.5, 0.9)
    assert keep == {"a": 25, "b": 25, "c": 100}


def test_ecoflap_floor_binds_for_low_scores():
    sizes = {"a": 1000, "b": 1000}
    sp = ratios.ecoflap({"a": 1e-9, "b": 1.0}, sizes, target=0.6, max_sparsity=0.7)
    assert sp["a"] == pytest.approx(0.7)  # floor: keeps exactly 1 - max_sparsity
    assert sp["b"] == pytest.approx(0.5)
    assert (1 - sp["a"]) * 1000 + (1 - sp["b"]) * 1000 == 800


def test_ecoflap_avg_divides_by_size():
    # keep *counts* follow the scores (as in the authors' code). Equal per-weight importance:
    # "avg" makes the two scores equal, so both blocks get 100 of the 200 kept weights;
    # "sum" leaves them 100:300, so the counts follow the sizes and the ratios are equal.
    sizes = {"a": 100, "b": 300}
    assert ratios.ecoflap_keep_counts({"a": 1.0, "b": 1.0}, sizes, 0.5, 1.0) == {"a": 100, "b": 100}
    sp_avg = ratios.ecoflap({"a": 100.0, "b": 300.0}, sizes, 0.5, 1.0, aggregation="avg")
    assert sp_avg == pytest.approx({"a": 0.0, "b": 2 / 3})
    sp_sum = ratios.ecoflap({"a": 100.0, "b": 300.0}, sizes, 0.5, 1.0, aggregation="sum")
    assert sp_sum == pytest.approx({"a": 0.5, "b": 0.5})


def test_ecoflap_rejects_bad_input():
    with pytest.raises(ValueError, match="max_sparsity"):
        ratios.ecoflap_keep_counts({"a": 1}, {"a": 10}, 0.5, 0.4)
    with pytest.raises(ValueError, match="finite"):
        ratios.ecoflap_keep_counts({"a": math.nan}, {"a": 10}, 0.5, 0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ratios.ecoflap_keep_counts({"a": 1}, {"a": 10}, 1.5, 1.6)


def test_owl_hand_worked():
    sp = ratios.owl({"a": 1.0, "b": 2.0, "c": 3.0}, target=0.5, lam=0.1)
    assert sp == pytest.approx({"a": 0.6, "b": 0.5, "c": 0.4})


def test_owl_equal_ratios_is_uniform():
    assert ratios.owl({"a": 2.0, "b": 2.0}, 0.7) == {"a": 0.7, "b": 0.7}


def test_owl_reaches_the_target_when_blocks_differ_in_size():
    """Their plain-mean shift is exact only for equal blocks (a decoder LM, where ours gives the same
    ratios); a T5 or a BLIP-2 has blocks of different sizes, and a plain mean missed the target."""
    outliers, sizes = {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 100, "b": 1000, "c": 1000}
    sp = ratios.owl(outliers, 0.5, 0.1, sizes)
    assert sum(sp[u] * sizes[u] for u in sizes) / sum(sizes.values()) == pytest.approx(0.5)
    assert sp["a"] - sp["b"] == pytest.approx(0.1) and sp["b"] - sp["c"] == pytest.approx(0.1)
    assert ratios.owl(outliers, 0.5, 0.1, {u: 7 for u in outliers}) == pytest.approx(ratios.owl(outliers, 0.5, 0.1))


def test_owl_never_clips_a_ratio_silently():
    """Clipping a ratio to [0, 1] moved the global sparsity away from the target (0.95 gave 0.94,
    and target 0 pruned 3 %): a ratio outside [0, 1) is an error naming lambda, target 0 is dense."""
    outliers = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 30.0}
    with pytest.raises(ValueError, match="lower the method's lambda"):
        ratios.owl(outliers, 0.97, 0.08)
    assert ratios.owl(outliers, 0.0, 0.08) == {u: 0.0 for u in outliers}
    assert max(ratios.owl(outliers, 0.9, 0.04).values()) < 1


def test_plan_refuses_scores_of_another_scorer_and_bad_targets():
    """allocate read whatever scores file it was given: OWL's outlier shares as ECoFLaP importances,
    ECoFLaP importances as ATP depths; a target of 1.5 or NaN was planned and written."""
    from ecoflap.allocation.plan import plan_allocation

    layout = {f"b.{i}": {f"b.{i}.fc": 100} for i in range(3)}
    laid = {"layout": layout}
    owl_scores = {"kind": "outliers", "granularity": "block", "scores": {b: 1.0 + i for i, b in enumerate(layout)}}
    with pytest.raises(ValueError, match="reads scores of kind zeroth_order or first_order or checkpointed"):
        plan_allocation(laid, owl_scores, {"allocation": "ecoflap"}, 0.5)
    assert plan_allocation(laid, owl_scores, {"allocation": "owl"}, 0.5)["planned_global_sparsity"] == pytest.approx(0.5)
    for bad in (1.5, math.nan, -0.1):
        with pytest.raises(ValueError, match=r"target sparsity must be a number in \[0, 1\)"):
            plan_allocation(laid, None, {"allocation": "uniform"}, bad)


def test_plan_refuses_a_unit_pruned_whole():
    """ECoFLaP at 0.9 with the default offset has max_sparsity 1: a near-zero score planned a
    block at 1.0, which allocate wrote and prune refused, telling the user to rerun allocate."""
    from ecoflap.allocation.plan import plan_allocation

    layout = {f"b.{i}": {f"b.{i}.fc": 1000} for i in range(4)}
    scored = {"kind": "zeroth_order", "granularity": "block",
              "scores": {"b.0": 0.0, "b.1": 50.0, "b.2": 50.0, "b.3": 50.0}}
    with pytest.raises(ValueError, match=r"plans b\.0 at sparsity 1\.0000 .*lower the method's max_sparsity_offset"):
        plan_allocation({"layout": layout}, scored, {"allocation": "ecoflap"}, 0.9)
    fine = plan_allocation({"layout": layout}, scored, {"allocation": "ecoflap", "max_sparsity_offset": 0.05}, 0.9)
    assert max(fine["unit_sparsity"].values()) == pytest.approx(0.95)


def test_expand_to_layers():
    layout = {"blk.0": {"blk.0.q": 4, "blk.0.k": 4}, "blk.1": {"blk.1.q": 4}}
    assert ratios.expand_to_layers({"blk.0": 0.3, "blk.1": 0.6}, layout) == {"blk.0.q": 0.3, "blk.0.k": 0.3,
                                                                            "blk.1.q": 0.6}
    with pytest.raises(KeyError):
        ratios.expand_to_layers({"blk.0": 0.3}, layout)


@settings(max_examples=300, deadline=None)
@given(
    units=st.lists(st.tuples(st.integers(1, 5000), st.one_of(st.just(0.0), st.floats(0, 1e6))), min_size=1,
                   max_size=12),
    target=st.floats(0, 0.99),
    offset=st.floats(0, 1),
)
def test_ecoflap_properties(units, target, offset):
    sizes = {f"u{i}": n for i, (n, _) in enumerate(units)}
    scores = {f"u{i}": s for i, (_, s) in enumerate(units)}
    max_sparsity = min(target + offset, 1.0)
    floor = {u: math.floor((1 - max_sparsity) * n + 1e-9) for u, n in sizes.items()}
    if round((1 - target) * sum(sizes.values())) > sum(floor.values()) and \
            not any(scores[u] > 0 for u in sizes if sizes[u] > floor[u]):
        with pytest.raises(ValueError, match="every unit's score is 0"):  # nothing to share the budget by
            ratios.ecoflap_keep_counts(scores, sizes, target, max_sparsity)
        return
    keep = ratios.ecoflap_keep_counts(scores, sizes, target, max_sparsity)
    assert sum(keep.values()) == round((1 - target) * sum(sizes.values()))
    for u, n in sizes.items():
        assert math.floor((1 - max_sparsity) * n + 1e-9) <= keep[u] <= n


def test_dense_blocks_are_emptied_after_the_allocation_without_redistribution():
    """The authors' EVA-CLIP evaluation restores the last vision block's dense weights: the other
    blocks keep the ratios the allocation gave them, and the model ends below the target."""
    from ecoflap.allocation.plan import plan_allocation

    layout = {f"b.{i}": {f"b.{i}.fc": 100} for i in range(4)}
    laid = {"layout": layout, "submodel_of_block": {b: "vision" for b in layout}}
    scored = {"granularity": "block", "scores": {"b.0": 4.0, "b.1": 3.0, "b.2": 2.0, "b.3": 1.0}}
    method = {"allocation": "ecoflap", "max_sparsity_offset": 0.1}
    full = plan_allocation(laid, scored, method, 0.5)
    kept = plan_allocation(laid, scored, {**method, "dense_blocks": ["b.3"]}, 0.5)
    assert kept["layer_sparsity"]["b.3.fc"] == 0.0 and full["layer_sparsity"]["b.3.fc"] > 0
    assert all(kept["layer_sparsity"][f"b.{i}.fc"] == full["layer_sparsity"][f"b.{i}.fc"] for i in range(3))
    assert math.isclose(kept["planned_global_sparsity"], 0.5 - full["layer_sparsity"]["b.3.fc"] / 4)
    with pytest.raises(ValueError, match="not blocks of this model's layout"):
        plan_allocation(laid, scored, {**method, "dense_blocks": ["b.9"]}, 0.5)


def test_ecoflap_refuses_scores_that_are_all_zero():
    """All-zero scores (a loss that reaches no block) fell back to sharing by capacity: a plan
    that looked like ECoFLaP's with no signal behind it."""
    from ecoflap.allocation import ratios as R

    with pytest.raises(ValueError, match="every unit's score is 0"):
        R.ecoflap({"a": 0.0, "b": 0.0}, {"a": 100, "b": 300}, 0.5, 0.6)
    assert R.ecoflap({"a": 0.0, "b": 1.0}, {"a": 100, "b": 300}, 0.5, 0.6)["a"] == pytest.approx(0.6)
