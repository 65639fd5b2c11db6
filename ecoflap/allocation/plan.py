"""An allocation plan: from a model's layout (layout.json), its scores (scores/<scorer>.json)
and a method's settings, the sparsity of every prunable layer. Sub-model selection, the
unit-to-block mapping, one budget per group and the planned sparsity live here, so the CLI,
the benchmark and a user's notebook all get the same plan."""
from __future__ import annotations

from typing import Any

from ecoflap import catalog
from ecoflap.allocation import ratios
from ecoflap.utils.sparsity import sparsity_by_group, weighted_sparsity

# the option that widens each allocation's spread around the target: what to lower when a unit reaches 1
_SPREAD = {"ecoflap": "max_sparsity_offset (max_sparsity = target + offset, at most 1)", "owl": "lambda",
           "alphapruning": "epsilon", "atp": "step"}


def plan_allocation(laid_out: dict[str, Any], scored: dict[str, Any] | None, method: dict[str, Any],
                    target: float) -> dict[str, Any]:
    """`laid_out`: layout.json's content; `scored`: a scores file's content (None for uniform);
    `method`: a config methods: entry (allocation, its options, scope, submodels; catalog
    defaults fill what it leaves out). Returns what allocation.json holds, without provenance."""
    kind = method.get("allocation", "uniform")
    options = catalog.settings(catalog.ALLOCATIONS, kind, method)  # checks the kind
    if not (isinstance(target, (int, float)) and 0 <= target < 1):
        raise ValueError(f"target sparsity must be a number in [0, 1), got {target!r}")
    wanted = catalog.ALLOCATION_SCORERS[kind]
    if wanted and (scored or {}).get("kind", wanted[0]) not in wanted:
        # a scores file names its kind (in-memory scores may not): OWL's outlier percentages read as
        # ECoFLaP importances would give a plan, but a meaningless one
        raise ValueError(f"allocation {kind} reads scores of kind {' or '.join(wanted)}, but the scores file holds "
                         f"{scored.get('kind')!r}; pass the scores of the method's scorer")
    # options a searching scorer chose for this target (atp_search's step), where the method leaves them unset
    chosen = ((scored or {}).get("record") or {}).get("chosen", {}).get(f"{target:g}", {})
    searched = {k: v for k, v in chosen.items() if k in options and options[k] is None}
    narrowed = {k: method[k] for k in ("submodels", "dense_blocks") if method.get(k)}
    if method.get("scope") == "submodel":
        narrowed["scope"] = "submodel"
    if searched and narrowed:
        # the search (scoring/atp_search.py) pruned every block of every sub-model under one budget
        raise ValueError(f"allocation {kind} would take {searched} from its scorer's search, which pruned the whole "
                         f"model under one budget, but this method sets {narrowed}: set {', '.join(searched)} in the "
                         "method, or drop those settings")
    options.update(searched)
    allocator = catalog.ALLOCATIONS[kind]
    scope = method.get("scope") or "global"
    submodel_of_block = laid_out.get("submodel_of_block") or {b: "language" for b in laid_out["layout"]}
    layout = ratios.select_submodels(laid_out["layout"], submodel_of_block, method.get("submodels"))
    if catalog.ALLOCATION_SCORERS[kind]:
        if scored is None:
            raise ValueError(f"allocation {kind} needs scores (a scorer of kind "
                             f"{' or '.join(catalog.ALLOCATION_SCORERS[kind])})")
        granularity = scored.get("granularity", "block")
    else:
        granularity = "block"
    sizes = ratios.unit_sizes(layout, granularity)
    scores = {u: scored["scores"][u] for u in sizes} if catalog.ALLOCATION_SCORERS[kind] else {u: 0.0 for u in sizes}
    block_of_unit = {u: next(b for b in layout if u == b or u.startswith(b + ".")) for u in sizes}
    group_of_unit = {u: submodel_of_block[block_of_unit[u]] if scope == "submodel" else "all" for u in sizes}
    allocate = allocator.load()
    unit = ratios.per_group(lambda sc, sz: allocate(sc, sz, target, **allocator.arguments(options)),
                            scores, sizes, group_of_unit)
    dense = method.get("dense_blocks") or []
    unknown = [b for b in dense if b not in layout]
    if unknown:
        raise ValueError(f"dense_blocks {unknown} are not blocks of this model's layout (e.g. {list(layout)[-1]})")
    # after the allocation, without redistributing: the last block of a stack kept dense this way is
    # exactly "prune, then put its dense weights back" (nothing after it read its pruned outputs)
    unit = {u: 0.0 if block_of_unit[u] in dense else s for u, s in unit.items()}
    whole = {u: s for u, s in unit.items() if s >= 1}
    if whole:
        u, s = next(iter(whole.items()))
        raise ValueError(f"allocation {kind} at target {target:g} plans {u} at sparsity {s:.4f} ({len(whole)} unit(s) "
                         f"at 1): a layer is never pruned whole; lower the method's {_SPREAD.get(kind, 'spread')}")
    per_layer = ratios.expand_to_layers(unit, layout)
    layer_sizes = {k: n for v in layout.values() for k, n in v.items()}
    submodel_of_layer = {k: submodel_of_block[b] for b, layers in layout.items() for k in layers}
    return {"kind": kind, "target": target, "scope": scope, "options": options,
            "submodels": sorted(set(submodel_of_layer.values())),
            "planned_global_sparsity": weighted_sparsity(per_layer, layer_sizes),
            "planned_submodel_sparsity": sparsity_by_group(per_layer, layer_sizes, submodel_of_layer),
            "unit_sparsity": unit, "layer_sparsity": per_layer}
