"""Every name the configuration can use, with its options and defaults, in one place and
without importing torch (the config is validated before any job is planned).

Read by: the JSON schema (its scorer, method and pruning objects and its enums are built
from these tables, `config.schema()`), the config check (`ecoflap/config.py`), the CLI's
choices and each stage's settings (`settings()`: catalog defaults, then the config entry,
then flags given by hand), the rules (`workflow/rules/common.smk`) and the report.

The method tables double as the registries: each entry names the function or class that
implements it (`impl`, "module:attribute"), imported only when a stage runs it. Adding a
scorer, an allocation or a pruner is one new module plus one entry here; the schema, the
config check and the CLI follow. `python -m ecoflap catalog` prints this file's contents.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One setting of a method: its default and the JSON-schema fragment that checks it."""

    default: Any
    schema: dict[str, Any]
    help: str = ""
    arg: str | None = None  # the implementation's keyword, where the config name cannot be one ("lambda")


@dataclass(frozen=True)
class Method:
    """A scorer, an allocation or a pruner: what implements it and the settings it takes."""

    impl: str  # "module:attribute", imported when a stage runs it
    help: str
    options: dict[str, Option] = field(default_factory=dict)
    seeded: bool = False  # the implementation takes seed= (random directions)
    records: bool = False  # a scorer returning (scores, record): what it searched and chose, kept in its file
    needs_targets: bool = False  # a scorer given the run's target sparsities (targets=)
    auto_dtype: str | None = None  # what `dtype: auto` loads the model as for this scorer, where bf16 would be wrong

    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items()}

    def arguments(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The implementation's keyword arguments for these settings (the method's options only)."""
        return {o.arg or k: settings[k] for k, o in self.options.items()}

    def load(self) -> Any:
        module, attr = self.impl.split(":")
        return getattr(importlib.import_module(module), attr)


def _enum(*values: str) -> dict[str, Any]:
    return {"enum": list(values)}


_POS_INT = {"type": "integer", "minimum": 1}
_GRANULARITY = Option("block", _enum("block", "layer"), "score whole blocks (one ratio per block) or single layers")

# --- coarse stage: scorers (scoring/) --------------------------------------------------------
# Each implementation is called as fn(model, adapter, batches, device, **options) -> {unit: score}
# (plus seed= where `seeded`).
SCORERS: dict[str, Method] = {
    "zeroth_order": Method(
        "ecoflap.scoring.zeroth_order:zeroth_order_scores",
        "the paper's finite differences (two forward passes per unit and batch)",
        {"granularity": _GRANULARITY,
         "eps": Option(1e-3, {"type": "number", "exclusiveMinimum": 0}, "perturbation size"),
         "reuse_block_inputs": Option(True, {"type": "boolean"},
                                      "re-run only from the perturbed block (single-stack models)"),
         "perturb": Option("unit", _enum("unit", "tensor"),
                           "one direction per scored unit, or one weight tensor at a time with the tensors' scores "
                           "summed into their block (granularity block; the authors' BLIP-2 runs)")},
        # eps-sized steps are below bfloat16's resolution (8 bits): see zeroth_order.py
        seeded=True, auto_dtype="float32"),
    "first_order": Method(
        "ecoflap.scoring.first_order:first_order_scores",
        "the paper's first-order variant: one full backward pass per batch",
        {"granularity": _GRANULARITY,
         "reduce": Option("abs_wg", _enum("abs_g", "abs_wg"), "sum |g| or sum |w g| per unit")}),
    "checkpointed": Method(
        "ecoflap.scoring.checkpointed:checkpointed_gradient_scores",
        "exact gradients at inference-level memory (block-wise recomputation)",
        {"granularity": _GRANULARITY,
         "reduce": Option("abs_wg", _enum("l2", "projection", "abs_g", "abs_wg"),
                          "l2: ||g|| (what zeroth_order estimates); projection: |z.g| with zeroth_order's directions; "
                          "abs_g / abs_wg: the first-order scores")},
        seeded=True),
    "outliers": Method(
        "ecoflap.scoring.outliers:outlier_ratios",
        "OWL's layer-wise outlier ratios (per block)",
        {"m": Option(5.0, {"type": "number", "exclusiveMinimum": 0}, "outlier threshold, times the block's mean")}),
    "esd_alpha": Method(
        "ecoflap.scoring.esd_alpha:esd_alpha_scores",
        "AlphaPruning's heavy-tail exponent of each matrix's eigenvalue spectrum (data-free)",
        {"granularity": _GRANULARITY,
         "fix_fingers": Option("xmin_peak", _enum("xmin_peak", "xmin_mid"),
                               "how the tail's start is chosen (the authors' default: xmin_peak)"),
         "bins": Option(100, _POS_INT, "xmin_peak: histogram bins over log10 eigenvalues"),
         "xmin_pos": Option(2, _POS_INT, "xmin_mid: the tail starts at eigenvalue N / xmin_pos")}),
    "atp_search": Method(
        "ecoflap.scoring.atp_search:atp_search_scores",
        "ATP's grid search over the slope of sparsity rising with depth (one prune-and-measure run per step)",
        {"step": Option(0.002, {"type": "number", "exclusiveMinimum": 0},
                        "grid: step, 2 step, ... below the largest legal slope (their search.sh)"),
         "pruner": Option("wanda", _enum("magnitude", "wanda", "sparsegpt"),
                          "the pruner of each search run (their search uses the method's own)")},
        records=True, needs_targets=True),
}
# settings every scorer entry takes besides its options (n_samples defaults to the calibration's)
SCORER_COMMON: dict[str, Option] = {
    "n_samples": Option(None, _POS_INT, "calibration windows used (default: all)"),
    "batch_size": Option(8, _POS_INT, "windows per forward pass"),
    "seed": Option(None, {"type": "integer", "minimum": 0}, "directions' seed (default: the run's seed)"),
    "threads": Option(None, _POS_INT, "torch threads of this scorer's job in the workflow (default: "
                      "stage_threads.score, else threads); a batch-1 zeroth_order pass gains little from a second"),
}

# --- allocation (allocation/) ----------------------------------------------------------------
# Each implementation is called as fn(scores, sizes, target, **options) -> {unit: sparsity}
# (allocation/allocators.py: the registry's side; the math is in allocation/ratios.py).
ALLOCATIONS: dict[str, Method] = {
    "uniform": Method("ecoflap.allocation.allocators:uniform", "the target sparsity for every layer"),
    "ecoflap": Method(
        "ecoflap.allocation.allocators:ecoflap", "keep budget shared in proportion to the scores (the paper)",
        {"max_sparsity_offset": Option(0.1, {"type": "number", "minimum": 0, "maximum": 1},
                                       "no unit is pruned beyond target + this"),
         "aggregation": Option("sum", _enum("sum", "avg"), "avg: divide each unit's score by its weight count")}),
    "owl": Method(
        "ecoflap.allocation.allocators:owl", "OWL's outlier-weighted ratios",
        {"lambda": Option(0.08, {"type": "number", "minimum": 0, "maximum": 0.5},
                          "ratios spread over target +/- lambda", arg="lam")}),
    "alphapruning": Method(
        "ecoflap.allocation.allocators:alphapruning", "AlphaPruning: sparsity rising linearly with the ESD alpha",
        {"epsilon": Option(0.3, {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                           "ratios spread over target x [1 - epsilon, 1 + epsilon] before rescaling (their "
                           "default; their LLaMA-7B Wanda script uses 0.2)")}),
    "atp": Method(
        "ecoflap.allocation.allocators:atp", "ATP: sparsity rising linearly with depth, mean equal to the target",
        {"step": Option(None, {"type": ["number", "null"], "minimum": 0},
                        "sparsity added per block of depth; null: the step the atp_search scorer chose for the target")}),
}
# which scorer kinds an allocation reads (uniform reads none)
ALLOCATION_SCORERS: dict[str, tuple[str, ...]] = {
    "uniform": (), "ecoflap": ("zeroth_order", "first_order", "checkpointed"), "owl": ("outliers",),
    "alphapruning": ("esd_alpha",), "atp": ("atp_search",)}

# --- fine stage: layer-wise pruners (pruning/) -----------------------------------------------
# Each implementation is a class built as cls(**options) with needs_activations, init_stats,
# add_batch and prune (pruning/methods.py).
COUNT_RULES = ("round", "reference")
# how many weights a ratio prunes (pruning/masks.py): `round`, the ratio of the row (SparseGPT: of the
# column block) to the nearest weight; `reference`, as the code behind the published numbers counts
_COUNTS = Option("round", {"enum": list(COUNT_RULES)},
                 "weights pruned per row (SparseGPT: per column block): round(n x ratio); or reference, as "
                 "Wanda's and the ECoFLaP authors' code counts: int(n x ratio) per row, and SparseGPT every "
                 "saliency <= the int(n x ratio)-th smallest of a block (int(n x ratio) + 1, more on ties)")
PRUNERS: dict[str, Method] = {
    "magnitude": Method("ecoflap.pruning.methods:Magnitude", "|W| within each output row; no calibration data",
                        {"counts": _COUNTS}),
    "wanda": Method("ecoflap.pruning.methods:Wanda", "|W| ||X|| within each output row (Sun et al. 2024)",
                    {"counts": _COUNTS}),
    "sparsegpt": Method(
        "ecoflap.pruning.methods:SparseGPT", "OBS reconstruction (Frantar and Alistarh 2023)",
        {"damp": Option(0.01, {"type": "number", "exclusiveMinimum": 0}, "Hessian dampening, times its mean diagonal"),
         "block_size": Option(128, _POS_INT, "columns per lazy-update block"),
         "counts": _COUNTS,
         "damping": Option("always", {"enum": ["always", "on_failure"]},
                           "always: add damp x mean diagonal to H (SparseGPT's and Wanda's code); on_failure: "
                           "factor H undamped and add it only after a failed factorisation, again until one "
                           "succeeds, for H and for its inverse (the ECoFLaP authors' sparsegpt_pruner.py)")}),
}
# mask refinement after a layer's pruner, at the same sparsity (a method's `refine:`); the
# implementation is a class built as cls(**options) with applies_to, init_stats, add_batch, refine
REFINERS: dict[str, Method] = {
    "dsnot": Method(
        "ecoflap.pruning.dsnot:DSnoT", "DSnoT: prune-and-grow swaps toward zero reconstruction error (Zhang et al. 2024)",
        {"max_cycles": Option(50, _POS_INT, "swaps per row at most (their max_cycle_time)"),
         "update_threshold": Option(0.1, {"type": "number", "minimum": 0},
                                    "a row stops once |its error| is at most this (their scale: a window's token sum)"),
         "pow_of_var_regrowing": Option(1.0, {"type": "number", "minimum": 0},
                                        "the grow order divides W s by var^this"),
         "skip_layers": Option(["mlp"], {"type": "array", "items": {"enum": ["mlp", "attention"]}, "uniqueItems": True},
                               "layers of these roles keep the pruner's mask, the same in every family (their "
                               "default: the MLP; [] refines every layer)"),
         "same_sign": Option(False, {"type": "boolean"},
                             "unstructured: stop a row at a swap that flips its error's sign (their default: off; "
                             "N:M always checks)")}),
}
NO_REFINE = "none"
# settings of the `pruning:` entry every pruner shares
PRUNING_COMMON: dict[str, Option] = {
    "n_samples": Option(None, _POS_INT, "calibration windows used (default: all)"),
    "batch_size": Option(8, _POS_INT, "windows per forward pass"),
}
NO_PRUNER = "none"  # a method with pruner: none is the dense row
# the `pruning:` keys that set pruners' options (config name -> the pruners that read it, their option)
PRUNER_CONFIG_KEYS = {"sparsegpt_damp": (("sparsegpt",), "damp"), "sparsegpt_block_size": (("sparsegpt",), "block_size"),
                      "sparsegpt_damping": (("sparsegpt",), "damping"),
                      "counts": (("magnitude", "wanda", "sparsegpt"), "counts")}
COMPARISON_GROUPS = ("row", "matrix")  # magnitude/Wanda: scores compared within a row or a whole matrix


# --- model families (models/families/) -------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """What a family can do, declared (the adapters read their capabilities from here)."""

    tasks: tuple[str, ...]
    submodels: tuple[str, ...]
    single_stack: bool = False  # one stack and a head: scorers may re-run the model from a block to the loss
    image_calibration: bool = True
    prefix_calibration: bool = False  # ECoFLaP's prefix/target captioning loss (calibration protocol ecoflap)
    reranks: bool = False  # retrieval re-ranks its top k with an image-text matching head
    encoder_decoder: bool = False  # text calibration split into an encoder input and a decoder target
    labelled_images: bool = False  # calibrated on labelled images (a classifier's own loss), not captions
    context_padding: bool = False  # OpenAI CLIP's text input: padded to the whole context (calibration protocol coop)


TEXT_EVALS = ("perplexity", "lm_eval")  # evaluation entries named by their task; run together in one job

FAMILIES: dict[str, Family] = {
    "causal_lm": Family(TEXT_EVALS, ("language",), single_stack=True, image_calibration=False),
    "seq2seq_lm": Family(("lm_eval",), ("language",), image_calibration=False, encoder_decoder=True),
    "blip2": Family(("vqa", "caption"), ("vision", "qformer", "language"), prefix_calibration=True),
    "instructblip": Family(("vqa", "caption"), ("vision", "qformer", "language"), prefix_calibration=True),
    "blip2_retrieval": Family(("retrieval",), ("vision", "qformer"), reranks=True),
    "clip": Family(("retrieval", "classification"), ("vision", "language"), context_padding=True),
    "image_classifier": Family(("classification",), ("vision",), labelled_images=True),
    # open_clip's EVA-CLIP: the vision tower pruned, calibrated and scored with the zero-shot classifier
    "eva_clip": Family(("classification",), ("vision",), labelled_images=True),
    # chat VLMs (models/chat_vlm.py): vision tower and language model, the projector kept dense
    **{name: Family(("vqa", "caption"), ("vision", "language"))
       for name in ("llava", "qwen_vl", "idefics3", "gemma3", "internvl")},
    "blip_caption": Family(("caption",), ("vision", "language")),
    "blip_vqa": Family(("vqa",), ("vision", "language")),
    "blip_retrieval": Family(("retrieval",), ("vision", "language")),
}
DEFAULT_FAMILY = "causal_lm"
SUBMODELS = ("vision", "qformer", "language")
VL_TASKS = ("vqa", "caption", "retrieval", "classification")
EMBEDDED_MODELS = ("smollm2-135m", "fashion-clip", "fashion-vit")
TRAINED_EMBEDDED = ("fashion-clip", "fashion-vit")  # trained at download, seeded with the top-level seed
OFFLOAD_MODES = ("auto", "none", "cpu", "disk")
ACTIVATION_PLACES = ("auto", "device", "cpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# --- calibration sources (data/) -------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSource:
    image: bool  # image-caption pairs (else text windows)
    needs: tuple[str, ...] = ()  # calibration keys the source reads
    labelled: bool = False  # images with class labels (image classifiers calibrate on these)
    captioned: bool = True  # images with captions (or captions made from the labels)


CALIBRATION_SOURCES: dict[str, CalibrationSource] = {
    "austen-emma": CalibrationSource(image=False),  # embedded
    "c4": CalibrationSource(image=False),
    "cc3m": CalibrationSource(image=True, needs=("pairs",)),
    "coco": CalibrationSource(image=True, needs=("captions", "image_dir")),
    "fashion-mnist": CalibrationSource(image=True, labelled=True),  # embedded
    "imagenet": CalibrationSource(image=True, needs=("train_dir",), labelled=True, captioned=False),
    # a CoOp data set's train split (the CLIP table): captions from the data set's zero-shot prompt
    "coop": CalibrationSource(image=True, needs=("root", "dataset")),
}
IMAGE_SOURCES = tuple(k for k, v in CALIBRATION_SOURCES.items() if v.image)
# calibration keys that name files of image-caption pairs (passed to `calibrate`, hashed in provenance)
PAIR_FILE_KEYS = ("pairs", "image_root", "captions", "image_dir", "cache_dir", "train_dir", "root")
# evaluation entry keys naming a file whose hash its result records (folders of images are not hashed)
EVAL_FILE_KEYS = ("questions", "annotations", "karpathy_json", "ocr_tokens")
CAPTION_PROTOCOLS = ("caption", "ecoflap", "coop")
CALIBRATION_DEFAULTS: dict[str, Any] = {"source": "austen-emma", "n_samples": 128, "seq_len": 128, "prompt": "",
                                        "protocol": "caption", "max_txt_len": 32}


def calibration_keys_read(calib: dict[str, Any], family: Family) -> set[str]:
    """The calibration keys `calibrate` reads for this source, protocol and family (the rest
    are ignored there, so config.py refuses them rather than let them look as if they worked)."""
    source = CALIBRATION_SOURCES.get(calib.get("source", CALIBRATION_DEFAULTS["source"]))
    protocol = calib.get("protocol", CALIBRATION_DEFAULTS["protocol"])
    keys = {"source", "n_samples", *(source.needs if source else ())}
    if source is None or not source.image:  # text windows; an encoder-decoder splits them by its protocol
        if family.encoder_decoder:
            keys |= {"protocol", "max_txt_len" if protocol == "ecoflap" else "seq_len"}
        else:
            keys.add("seq_len")
    elif family.labelled_images:  # class labels through the classifier's own processor
        keys |= {"protocol"} if source.needs else set()
    else:
        keys |= {"protocol", {"caption": "prompt", "ecoflap": "max_txt_len"}.get(protocol, "protocol")}
        if "pairs" in keys:  # cc3m: paths relative to image_root; webdataset shards sampled into cache_dir
            keys |= {"image_root", "cache_dir"}
    return keys


# --- evaluation sets (evaluation/, data/eval_sets.py) ----------------------------------------
@dataclass(frozen=True)
class Dataset:
    task: str
    files: tuple[str, ...] = ()  # keys of the evaluation entry the dataset reads
    protocols: tuple[str, ...] = ()  # VQA accuracy rules; the first is what its published numbers used


DATASETS: dict[str, Dataset] = {
    "vqav2": Dataset("vqa", ("questions", "annotations", "image_dir"), ("vqaeval2016", "vqaeval2021")),
    "okvqa": Dataset("vqa", ("questions", "annotations", "image_dir"), ("vqaeval2016", "vqaeval2021")),
    "gqa": Dataset("vqa", ("questions", "image_dir"), ("lavis_gqa", "lavis_gqa_2023_12")),
    "textvqa": Dataset("vqa", ("questions", "image_dir"), ("textvqa_m4c",)),
    "nocaps": Dataset("caption", ("annotations", "image_dir")),
    "coco_karpathy": Dataset("caption", ("karpathy_json", "image_root")),
    "flickr30k": Dataset("retrieval", ("karpathy_json", "image_dir")),
    "imagenet": Dataset("classification", ("val_dir",)),
    "fashion_mnist": Dataset("classification"),
    # the rest of the CLIP table's data sets, in CoOp's layout (data/coop.py); imagenet is above
    **{name: Dataset("classification", ("root",)) for name in (
        "caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
        "stanford_cars", "sun397", "ucf101")},
}
PERPLEXITY_DATASETS = ("brown-heldout", "wikitext2")
TEXT_EVAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "perplexity": {"dataset": "brown-heldout", "seq_len": 2048, "max_windows": None, "batch_size": 1},
    "lm_eval": {"tasks": ["brown_cloze"], "limit": None, "num_fewshot": 0, "batch_size": 8},
}
VQA_PROTOCOLS = tuple(dict.fromkeys(p for d in DATASETS.values() for p in d.protocols))


def default_protocol(dataset: str) -> str | None:
    protocols = DATASETS[dataset].protocols
    return protocols[0] if protocols else None


# --- settings of one stage -------------------------------------------------------------------

def check_kind(table: dict[str, Method], kind: str) -> None:
    if kind not in table:
        raise ValueError(f"unknown kind {kind!r} (allowed: {', '.join(table)})")


# the keys of a methods: entry besides its allocation's and its refiner's options (config.py gives their schema)
METHOD_KEYS = ("pruner", "allocation", "scorer", "nm", "scope", "submodels", "dense_blocks", "threads", "refine")
PRUNING_KEYS = (*PRUNING_COMMON, *PRUNER_CONFIG_KEYS, "comparison", "keep_checkpoints")  # the pruning: entry


def _option_owners() -> dict[str, str]:
    owners = {k: f"allocation {kind}" for kind, m in ALLOCATIONS.items() for k in m.options}
    owners.update({k: f"refine: {kind}" for kind, m in REFINERS.items() for k in m.options})
    return owners


def method_entry_keys(entry: dict[str, Any]) -> set[str]:
    """What a methods: entry may hold: the common keys and its own allocation's and refiner's options."""
    no_options = Method("", "")
    return {*METHOD_KEYS, *ALLOCATIONS.get(entry.get("allocation", "uniform"), no_options).options,
            *REFINERS.get(entry.get("refine", NO_REFINE), no_options).options}


def misplaced_options(entry: dict[str, Any]) -> dict[str, str]:
    """Keys of a methods: entry that are options of an allocation or refiner other than the
    entry's own, with their owner: `lambda` on a uniform method, `max_cycles` without `refine`.
    The schema accepts them (one schema serves every method); they would do nothing."""
    own, owners = method_entry_keys(entry), _option_owners()
    return {k: owners[k] for k in entry if k in owners and k not in own}


def check_entry_keys(entry: dict[str, Any], allowed: set[str], what: str) -> None:
    """A stage's --spec holds only keys the stage reads: a typo, or another kind's option, did
    nothing before (settings() keeps only the method's own options)."""
    owners = _option_owners()
    ignored = [f"{k!r} ({'an option of ' + owners[k] if k in owners else 'unknown'})" for k in entry if k not in allowed]
    if ignored:
        raise ValueError(f"{what} holds {', '.join(ignored)}, which it would not read (allowed: "
                         f"{', '.join(sorted(allowed))})")


def settings(table: dict[str, Method], kind: str, entry: dict[str, Any] | None = None,
             common: dict[str, Option] | None = None) -> dict[str, Any]:
    """A method's settings: its catalog defaults, overridden by the config entry (which may
    hold other keys too; only the method's options and `common` are kept)."""
    check_kind(table, kind)
    entry = entry or {}
    keys = {**table[kind].options, **(common or {})}
    return {k: entry[k] if entry.get(k) is not None else o.default for k, o in keys.items()}


def option_schema(options: dict[str, Option]) -> dict[str, Any]:
    return {k: {**o.schema, **({"default": o.default} if o.default is not None else {}),
                **({"description": o.help} if o.help else {})} for k, o in options.items()}


def describe() -> str:
    """The catalog as text (`python -m ecoflap catalog`)."""
    lines = []
    for title, table in (("scorers", SCORERS), ("allocations", ALLOCATIONS), ("pruners", PRUNERS),
                         ("refiners (a method's refine:)", REFINERS)):
        lines.append(f"{title}:")
        for name, m in table.items():
            lines.append(f"  {name}: {m.help}  [{m.impl}]")
            for k, o in m.options.items():
                allowed = o.schema.get("enum")
                lines.append(f"      {k} = {o.default!r}" + (f"  (one of {', '.join(map(str, allowed))})" if allowed
                                                             else "") + (f"  {o.help}" if o.help else ""))
    lines.append("families:")
    for name, f in FAMILIES.items():
        lines.append(f"  {name}: tasks {', '.join(f.tasks)}; sub-models {', '.join(f.submodels)}")
    lines.append("calibration sources: " + ", ".join(f"{k} ({'image-caption pairs' if v.image else 'text'})"
                                                     for k, v in CALIBRATION_SOURCES.items()))
    lines.append("evaluation datasets: " + ", ".join(f"{k} ({v.task})" for k, v in DATASETS.items())
                 + "; perplexity: " + ", ".join(PERPLEXITY_DATASETS))
    return "\n".join(lines)
