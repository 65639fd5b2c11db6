"""Command line: one subcommand per pipeline stage. Each Snakemake rule calls one of these;
they are just as usable by hand (`python -m ecoflap prune --help`)."""
from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoflap import catalog
from ecoflap.allocation.plan import plan_allocation
from ecoflap.allocation.ratios import unit_sizes
from ecoflap.utils.io import provenance, read_json, write_json
from ecoflap.utils.runtime import (peak_memory_mb, resolve_device, resolve_dtype, seed_everything, setup_logging,
                                   torch_threads)
from ecoflap.utils.validate import check_allocation, check_layout, check_scores

if TYPE_CHECKING:
    import torch

# torch is imported inside the stages that run a model (the function-local imports below):
# allocate and aggregate never need it, and importing it (with transformers) is most of a
# short job's time.
MODEL_STAGES = ("calibrate", "score", "prune", "evaluate", "evaluate-text", "download", "benchmark-scoring")

log = logging.getLogger("ecoflap")


def _spec(args: argparse.Namespace, **flags: Any) -> dict[str, Any]:
    """A stage's config entry: --spec (JSON, or @file holding JSON), then the flags given by
    hand on top (a flag left out is None). Defaults come from the catalog, not from here."""
    text = args.spec or "{}"
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise ValueError(f"--spec {text}: cannot read it ({exc.strerror}); pass @<a JSON file>, or the JSON "
                             "itself") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--spec is not JSON ({exc}); pass the config entry as JSON, or @file") from None
    if not isinstance(spec, dict):
        raise ValueError("--spec must be a JSON object (the stage's config entry)")
    return {**spec, **{k: v for k, v in flags.items() if v is not None}}


def _load(args: argparse.Namespace):
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    log.info("loading %s on %s as %s (offload %s)", args.model, device, dtype, args.offload)
    model, tok = load_model(args.model, device, dtype, trust_remote_code=args.trust_remote_code,
                            offload=args.offload, family=args.family, activations=args.activations)
    adapter = adapter_for(model, args.family)
    _record_resolved(args, device, dtype, _offload_of(model, adapter))
    return model, tok, adapter, device, dtype


def _offload_of(model, adapter) -> str | None:
    from ecoflap.models.offload import offload_mode

    try:
        return offload_mode(adapter.blocks(model))
    except Exception:  # noqa: BLE001 - a record only; a model without blocks records none
        return None


def _record_resolved(args: argparse.Namespace, device, dtype, offload: str | None) -> None:
    """What `auto` became (device, dtype, offload mode), for the provenance: "auto" alone does
    not say whether a GPU run was bf16 or fp16."""
    resolved = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if offload is not None:
        resolved["offload"] = offload
    args._resolved = resolved


def tokenizer_fingerprint(tok: Any) -> str | None:
    """SHA-256 of a tokenizer's token -> id mapping (what calibration token ids mean), or None
    for inputs without one (an image classifier's processor)."""
    import hashlib

    tok = getattr(tok, "tokenizer", tok)  # vision-language Processors hold the tokenizer
    get_vocab = getattr(tok, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = sorted(get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _calibration_batches(path: str, n_samples: int | None, batch_size: int, dtype: torch.dtype,
                         tok: Any = None) -> list[dict[str, torch.Tensor]]:
    """Batches of model keyword arguments; pixel values in the model's dtype. With `tok` (the
    model's tokenizer), a calibration file whose recorded tokenizer is another one is refused:
    its token ids would mean other tokens to this model."""
    from ecoflap.data.calibration import batches, load_calibration
    from ecoflap.utils.io import tensor_metadata

    data = load_calibration(path, n_samples)
    recorded = tensor_metadata(path).get("tokenizer_sha256")
    if recorded and tok is not None:
        ours = tokenizer_fingerprint(tok)
        if ours is not None and ours != recorded:
            raise ValueError(f"{path} was tokenized with another tokenizer than this model's (tokenizer SHA-256 "
                             f"{recorded[:12]} there, {ours[:12]} here): its token ids would mean other tokens. "
                             "Build the calibration from this model (delete it and rerun the calibration rule, or "
                             "python -m ecoflap calibrate --model <this model>)")
    data = {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}
    return batches(data, batch_size)


def _finish(path: str, result: dict[str, Any], settings: dict[str, Any], inputs: dict[str, str],
            started: float, device: torch.device | None = None) -> None:
    result["runtime"] = {"wall_s": round(time.perf_counter() - started, 2),
                         "peak_mem_mb": round(peak_memory_mb(device), 1),
                         "device": str(device) if device else "cpu", "threads": torch_threads()}
    result["provenance"] = provenance(settings, inputs=inputs)
    write_json(path, result)
    log.info("wrote %s", path)


# --- stages -------------------------------------------------------------------------------

def cmd_download(args: argparse.Namespace) -> None:
    from ecoflap.models.layout import layout_of_folder
    from ecoflap.models.loading import fetch_model

    t0 = time.perf_counter()
    spec = _spec(args)
    fetch_model(spec, args.out)
    laid_out = layout_of_folder(args.out, spec.get("trust_remote_code", False))
    declared = spec.get("family")  # the workflow always states it (the config's, or causal_lm)
    if declared and laid_out["family"] != declared:  # checked before any job runs on the model
        raise ValueError(f"the config says family {declared!r}, but {args.out} is a {laid_out['architecture']}, "
                         f"family {laid_out['family']!r}; set `family: {laid_out['family']}` for this model in "
                         "config.yaml (or point the model entry at the checkpoint you meant)")
    layout = laid_out["layout"]
    n = sum(sum(v.values()) for v in layout.values())
    log.info("%s: %d blocks, %d prunable layers, %.1f M prunable weights", laid_out["family"], len(layout),
             sum(len(v) for v in layout.values()), n / 1e6)
    _finish(args.layout, {"spec": spec, **laid_out, "prunable_weights": n}, _settings(args, spec), {}, t0)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from ecoflap.data.calibration import build_calibration, save_calibration, seq2seq_calibration
    from ecoflap.models.image_calibration import build_image_caption_calibration
    from ecoflap.utils.io import save_tensors

    t0 = time.perf_counter()
    spec = _spec(args, source=args.source, n_samples=args.n_samples, seq_len=args.seq_len, prompt=args.prompt,
                 protocol=args.protocol, max_txt_len=args.max_txt_len, dataset=args.dataset,
                 **{k: getattr(args, k) for k in catalog.PAIR_FILE_KEYS})
    # the calibration: entry's keys only (a typo, or a seed, which is --seed, did nothing but was recorded)
    if "seed" in spec:
        raise ValueError(f"the calibration spec holds seed {spec['seed']!r}, which calibrate does not read: the windows "
                         f"are drawn with --seed ({args.seed}); pass --seed {spec['seed']} instead")
    catalog.check_entry_keys(spec, {*catalog.CALIBRATION_DEFAULTS, *catalog.PAIR_FILE_KEYS, "dataset"},
                             "the calibration spec")
    c = {**catalog.CALIBRATION_DEFAULTS, **spec}
    source = catalog.CALIBRATION_SOURCES.get(c["source"])
    if source is None:
        raise ValueError(f"unknown calibration source {c['source']!r} "
                         f"(allowed: {', '.join(catalog.CALIBRATION_SOURCES)})")
    meta = {"source": c["source"], "seed": str(args.seed)}
    inputs = {"model": args.model}
    if source.image:
        paths = {k: c[k] for k in catalog.PAIR_FILE_KEYS if c.get(k)}
        data = build_image_caption_calibration(args.model, c["source"], c["n_samples"], args.seed, paths, c["prompt"],
                                               c["protocol"], c["max_txt_len"], coop_dataset=c.get("dataset"))
        save_tensors(args.out, data, metadata={**meta, "prompt": c["prompt"], "protocol": c["protocol"]})
        inputs.update({k: v for k, v in paths.items() if k in ("pairs", "captions") and Path(v).is_file()})
    elif _family_of(args.model).encoder_decoder:  # an encoder input and a decoder target per sample
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        data = seq2seq_calibration(tok, c["source"], c["n_samples"], c["seq_len"], args.seed, c["protocol"],
                                   c["max_txt_len"])
        save_tensors(args.out, data, metadata={**meta, "protocol": c["protocol"], "max_txt_len": str(c["max_txt_len"]),
                                               "tokenizer_sha256": tokenizer_fingerprint(tok)})
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        data = {"input_ids": build_calibration(tok, c["source"], c["n_samples"], c["seq_len"], args.seed)}
        save_calibration(args.out, data["input_ids"], {**meta, "seq_len": str(c["seq_len"]),
                                                       "tokenizer_sha256": tokenizer_fingerprint(tok)})
    inputs["calibration"] = args.out
    _finish(args.out + ".json", {"shapes": {k: list(v.shape) for k, v in data.items()}},
            _settings(args, c), inputs, t0)


def _spec_threads(args: argparse.Namespace, threads: int | None) -> None:
    """A spec's `threads` (a scorers: or methods: entry given whole) when --threads is not
    given, as the workflow passes it; it was accepted, recorded and not applied."""
    if threads and not args.threads:
        import torch

        torch.set_num_threads(int(threads))


def _family_of(model_dir: str) -> catalog.Family:
    """The family of a downloaded checkpoint, from its config alone."""
    from ecoflap.models.layout import skeleton_of_folder
    from ecoflap.models.registry import adapter_for

    return adapter_for(skeleton_of_folder(model_dir)).capabilities


def _settings(args: argparse.Namespace, resolved: dict[str, Any]) -> dict[str, Any]:
    """What provenance records: the flags given (None: left out) and the stage's resolved settings."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "spec", "_resolved") and v is not None}
    return _as_ran({**given, **resolved}, args)


def _as_ran(settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`settings` with what ran in place of what was asked for (auto resolved: device, dtype,
    offload mode, threads), and what was asked for kept under `requested` where it differs."""
    ran = getattr(args, "_resolved", {})
    requested = {k: settings[k] for k in ran if k in settings and settings[k] != ran[k]}
    out = {**settings, **ran}
    if requested:
        out["requested"] = requested
    if torch_threads() is not None:
        out["threads"] = torch_threads()  # the threads used, not a spec's request nor None for the default
    return out


def cmd_score(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    spec = _spec(args, kind=args.kind, granularity=args.granularity, eps=args.eps,
                 reuse_block_inputs=args.reuse_block_inputs, perturb=args.perturb, reduce=args.reduce, m=args.owl_m,
                 n_samples=args.n_samples, batch_size=args.batch_size)
    if "kind" not in spec:
        raise ValueError(f"score needs a kind (in --spec or --kind; allowed: {', '.join(catalog.SCORERS)})")
    options = catalog.settings(catalog.SCORERS, spec["kind"], spec, catalog.SCORER_COMMON)  # checks the kind
    catalog.check_entry_keys(spec, {"kind", "targets", *catalog.SCORERS[spec["kind"]].options, *catalog.SCORER_COMMON},
                             f"the {spec['kind']} scorer's spec")
    scorer = catalog.SCORERS[spec["kind"]]
    _spec_threads(args, options.get("threads"))
    seed = options["seed"] if options["seed"] is not None else args.seed
    seed_everything(seed)
    if args.dtype == "auto" and scorer.auto_dtype:
        log.info("dtype auto: %s for the %s scorer", scorer.auto_dtype, spec["kind"])
        args.dtype = scorer.auto_dtype  # and so recorded in the provenance
    model, tok, adapter, device, dtype = _load(args)
    batches = _calibration_batches(args.calibration, options["n_samples"], options["batch_size"], dtype, tok)
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    log.info("scorer %s: %s", spec["kind"], scorer.arguments(options))
    extra = {"seed": seed} if scorer.seeded else {}
    if scorer.needs_targets:
        targets = args.targets or spec.get("targets")
        if not targets:
            raise ValueError(f"scorer {spec['kind']} searches per target sparsity: pass --targets (the workflow "
                             "passes the config's sparsities)")
        extra["targets"] = [float(t) for t in targets]
    t_compute = time.perf_counter()
    result = scorer.load()(model, adapter, batches, device, **scorer.arguments(options), **extra)
    scores, record = result if scorer.records else (result, None)
    # the scoring itself, without start-up and loading: what a cost ratio to a pruning pass compares
    out = {"kind": spec["kind"], "granularity": options.get("granularity", "block"), "scores": scores,
           "compute_s": time.perf_counter() - t_compute}
    if record is not None:
        out["record"] = record  # what the scorer searched and chose (allocation options per target)
    _finish(args.out, out, _settings(args, {"kind": spec["kind"], **options, "seed": seed, **extra}),
            {"model": args.model, "calibration": args.calibration}, t0, device)


def cmd_allocate(args: argparse.Namespace) -> None:
    from ecoflap.reporting.plots import plot_allocation  # matplotlib: only this stage needs it

    t0 = time.perf_counter()
    method = _spec(args, allocation=args.kind, max_sparsity_offset=args.max_sparsity_offset,
                   aggregation=args.aggregation, scope=args.scope, submodels=args.submodels,
                   **{"lambda": args.owl_lambda})
    kind = method.setdefault("allocation", "uniform")
    catalog.check_kind(catalog.ALLOCATIONS, kind)
    catalog.check_entry_keys(method, catalog.method_entry_keys(method), "the method's spec")
    if args.target is None or not 0 <= args.target < 1:  # NaN fails both comparisons
        raise ValueError(f"--target must be a sparsity in [0, 1), got {args.target}")
    laid_out = check_layout(read_json(args.layout), args.layout)
    inputs = {"layout": args.layout}
    scored = None
    if catalog.ALLOCATION_SCORERS[kind]:
        if not args.scores:
            raise ValueError(f"allocation {kind} needs --scores (a scorer of kind "
                             f"{' or '.join(catalog.ALLOCATION_SCORERS[kind])})")
        inputs["scores"] = args.scores
        scored = read_json(args.scores)
        units = set(unit_sizes(laid_out["layout"], scored.get("granularity", "block")))
        check_scores(scored, args.scores, units)
    plan = plan_allocation(laid_out, scored, method, args.target)
    unit = plan["unit_sparsity"]
    log.info("%s allocation (%s budget) at target %.3f: planned sparsity %.5f overall, %s; block range %.3f-%.3f",
             kind, plan["scope"], args.target, plan["planned_global_sparsity"],
             ", ".join(f"{g} {v:.4f}" for g, v in plan["planned_submodel_sparsity"].items()), min(unit.values()),
             max(unit.values()))
    if args.plot:
        plot_allocation(unit, args.plot, f"{kind} allocation, target {args.target}", args.target)
    _finish(args.out, plan, _settings(args, {**method, **plan["options"]}), inputs, t0)


def cmd_prune(args: argparse.Namespace) -> None:
    from ecoflap.models.base import model_layout
    from ecoflap.pruning.checkpoint import PrunedCheckpoint
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.masks import parse_nm
    from ecoflap.pruning.methods import make_pruner
    from ecoflap.utils.io import atomic_path, sha256_path, write_checksums

    t0 = time.perf_counter()
    spec = _spec(args, pruner=args.pruner, n_samples=args.n_samples, batch_size=args.batch_size,
                 sparsegpt_damp=args.sparsegpt_damp, sparsegpt_block_size=args.sparsegpt_block_size,
                 refine=args.refine)
    if spec.get("pruner") not in catalog.PRUNERS:
        raise ValueError(f"prune needs a pruner (in --spec or --pruner; allowed: {', '.join(catalog.PRUNERS)}), "
                         f"got {spec.get('pruner')!r}")
    # the pruning: entry with the method's pruner and refiner, or a whole methods: entry given by hand
    catalog.check_entry_keys(spec, {*catalog.PRUNING_KEYS, *catalog.method_entry_keys(spec)}, "the prune spec")
    # the pruner's options from the `pruning:` entry (sparsegpt_damp -> sparsegpt's damp), catalog defaults else
    own = {option: spec[key] for key, (names, option) in catalog.PRUNER_CONFIG_KEYS.items()
           if spec["pruner"] in names and spec.get(key) is not None}
    options = catalog.settings(catalog.PRUNERS, spec["pruner"], own)
    batch_size = spec.get("batch_size") or catalog.PRUNING_COMMON["batch_size"].default
    comparison = dict(item.split("=", 1) for item in args.comparison) if args.comparison else spec.get("comparison")
    _spec_threads(args, spec.get("threads"))  # a methods: entry given whole may set them
    seed_everything(args.seed)
    model, tok, adapter, device, dtype = _load(args)
    nm = parse_nm(args.nm)
    layers = {layer for block in model_layout(model, adapter).values() for layer in block}
    allocation = check_allocation(read_json(args.allocation), args.allocation, layers)
    if nm and abs(allocation["target"] - nm[0] / nm[1]) > 1e-9:  # N:M sets every ratio: the report's target lied
        raise ValueError(f"N:M {args.nm} prunes {nm[0] / nm[1]:g} of every layer, but {args.allocation} was made for "
                         f"target {allocation['target']:g}; pass the allocation made with --target "
                         f"{nm[0] / nm[1]:g} (the workflow's {nm[0]}of{nm[1]} row), or leave out --nm")
    pruner = make_pruner(spec["pruner"], **options)
    refine = spec.get("refine") or catalog.NO_REFINE
    refine_options = {} if refine == catalog.NO_REFINE else catalog.settings(catalog.REFINERS, refine, spec)
    refiner = None if refine == catalog.NO_REFINE else catalog.REFINERS[refine].load()(
        **catalog.REFINERS[refine].arguments(refine_options))
    needs_activations = pruner.needs_activations or refiner is not None
    if needs_activations and not args.calibration:
        raise ValueError(f"{spec['pruner']}{' with ' + refine if refiner else ''} needs calibration activations: "
                         "pass --calibration")
    batches = _calibration_batches(args.calibration, spec.get("n_samples"), batch_size, dtype, tok) \
        if needs_activations else []
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    # bytes the weights take on disk (a tied tensor counted once), for a full disk's message
    weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    with atomic_path(args.out, is_dir=True, expected_bytes=weight_bytes) as tmp:
        checkpoint = PrunedCheckpoint(model, adapter, args.model, tmp)
        if not checkpoint.names_match():
            checkpoint = None
        else:
            log.info("writing the pruned checkpoint to %s block by block", args.out)
        t_compute = time.perf_counter()
        report = prune_sequential(model, adapter, pruner, allocation["layer_sparsity"], batches, device, nm,
                                  comparison, refiner, checkpoint.write_block if checkpoint else None)
        # the pruning pass itself, without loading and saving: what a cost ratio compares
        compute_s = time.perf_counter() - t_compute - (checkpoint.seconds if checkpoint else 0.0)
        if checkpoint:
            checkpoint.finish(tok)
        else:  # tensor names differ from the model's (converted while loading): saved whole
            log.info("the checkpoint's tensor names are not the model's; saving it whole with save_pretrained")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        write_checksums(tmp)
    submodel_of_layer = {layer: sub for block, sub in adapter.submodel_of_block(model).items()
                         for layer in report.layer_size if layer.startswith(block + ".")}
    submodel_sparsity = report.sparsity_by(submodel_of_layer)
    log.info("achieved sparsity by sub-model: %s", submodel_sparsity)
    inputs = {"model": args.model, "allocation": args.allocation}
    if needs_activations:
        inputs["calibration"] = args.calibration
    _finish(args.report, {"pruner": spec["pruner"], "refine": refine, "nm": args.nm, "target": allocation["target"],
                          "compute_s": compute_s,
                          "global_sparsity": report.global_sparsity, "submodel_sparsity": submodel_sparsity,
                          "mask_sha256": report.mask_sha256,
                          "checkpoint_sha256": sha256_path(args.out),
                          "layer_sparsity": report.layer_sparsity},
            _settings(args, {**spec, "pruner_options": options, "refine_options": refine_options,
                             "comparison": comparison, "batch_size": batch_size}),
            inputs, t0, device)


def _text_evaluation(name: str, entry: dict[str, Any], model, tok, adapter, device, seed: int) -> dict[str, Any]:
    """One text evaluation entry (perplexity or lm_eval), catalog defaults under it."""
    from ecoflap.evaluation.harness import run_lm_eval
    from ecoflap.evaluation.perplexity import evaluation_text, perplexity

    e = {**catalog.TEXT_EVAL_DEFAULTS[name], **entry}
    if name == "perplexity":
        metrics = perplexity(model, tok, evaluation_text(e["dataset"]), e["seq_len"], device, e["max_windows"],
                             e["batch_size"], adapter)
        metrics["dataset"] = e["dataset"]
        return metrics
    return run_lm_eval(model, tok, e["tasks"], e["batch_size"], e["limit"], e["num_fewshot"], seed)


@functools.lru_cache(maxsize=None)
def _offload_mode(model: str, offload: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> str:
    """resolve_offload, once per process: _dispatches decides with it and _load_dispatched loads
    with it (each call builds the model's skeleton to size it, and reads the free memory)."""
    from ecoflap.models.loading import resolve_offload

    return resolve_offload(model, offload, dtype, device, trust_remote_code)


def _dispatches(args: argparse.Namespace) -> bool:
    """lm-eval and the vision-language tasks on GPUs with offload cpu or disk go through
    transformers' device_map (every GPU the job sees, then host memory or disk) instead of the
    block-by-block onloading that pruning, scoring and perplexity use."""
    device = resolve_device(args.device)
    return device.type == "cuda" and _offload_mode(args.model, args.offload, resolve_dtype(args.dtype, device),
                                                   device, args.trust_remote_code) != "none"


def _load_dispatched(args: argparse.Namespace):
    import atexit
    import shutil
    import tempfile

    from ecoflap.models.loading import load_dispatched
    from ecoflap.models.registry import adapter_for

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    folder = tempfile.mkdtemp(prefix="ecoflap-offload-")  # accelerate's, for weights it cannot read in place
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    mode = _offload_mode(args.model, args.offload, dtype, device, args.trust_remote_code)
    model, procs = load_dispatched(args.model, dtype, mode, folder, args.trust_remote_code, args.family)
    _record_resolved(args, device, dtype, mode)
    return model, procs, adapter_for(model, args.family), device, dtype


def _check_evaluation_keys(task: str, entry: dict[str, Any], what: str) -> None:
    """An evaluation entry holds only keys its task reads (a typo such as max_window ran every
    window and was recorded as if it had worked)."""
    if task in catalog.TEXT_EVAL_DEFAULTS:
        allowed = set(catalog.TEXT_EVAL_DEFAULTS[task])
    else:  # a vision-language entry: the config schema's keys, and the name the workflow adds
        from ecoflap.config import schema

        allowed = {*schema()["$defs"]["vl_evaluation"]["properties"], "name", "task"}
    catalog.check_entry_keys(entry, allowed, what)


def cmd_evaluate(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    seed_everything(args.seed)
    spec = _spec(args, dataset=args.dataset, seq_len=args.seq_len, max_windows=args.max_windows, tasks=args.tasks,
                 limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    _check_evaluation_keys(args.task, spec, f"the {args.task} evaluation's spec and flags")
    if args.task in catalog.TEXT_EVAL_DEFAULTS:
        spec = {**catalog.TEXT_EVAL_DEFAULTS[args.task], **spec}  # so recorded: what ran, defaults included
    generation = args.task in catalog.VL_TASKS or args.task == "lm_eval"
    model, tok, adapter, device, _dtype = _load_dispatched(args) if generation and _dispatches(args) else _load(args)
    predictions = None
    if args.task in catalog.VL_TASKS:
        from ecoflap.evaluation.vision_language import evaluate_vision_language

        metrics, predictions = evaluate_vision_language(model, tok, adapter, {**spec, "task": args.task})
    else:
        metrics = _text_evaluation(args.task, spec, model, tok, adapter, device, args.seed)
    result = {"task": args.task, "metrics": metrics}
    if predictions:
        result["predictions"] = predictions
    data_files = {k: spec[k] for k in catalog.EVAL_FILE_KEYS if spec.get(k) and Path(spec[k]).is_file()}
    _finish(args.out, result, _settings(args, spec), {"model": args.model, **data_files}, t0, device)


def cmd_evaluate_text(args: argparse.Namespace) -> None:
    """Every text evaluation of one checkpoint (perplexity, lm-eval) from one process and one
    model load; each entry still gets its own result file, settings and wall time. (With
    offload on GPUs, lm-eval gets a second load through device_map, after perplexity.)"""
    import gc

    seed_everything(args.seed)
    entries = _spec(args)
    for name in entries:
        if name not in catalog.TEXT_EVALS:
            raise ValueError(f"evaluate-text runs {' and '.join(catalog.TEXT_EVALS)} entries, not {name!r}")
        if not isinstance(entries[name], dict):
            raise ValueError(f"evaluate-text: the {name} entry must be a JSON object, got {entries[name]!r}")
        _check_evaluation_keys(name, entries[name], f"evaluate-text's {name} entry")
    dispatch = "lm_eval" in entries and _dispatches(args)
    loaded: dict[str, tuple] = {}
    for name, entry in entries.items():
        how = "dispatched" if dispatch and name == "lm_eval" else "blockwise"
        if how not in loaded:  # this entry's peak memory includes the load
            loaded.clear()  # one copy of the model at a time
            gc.collect()
            loaded[how] = _load_dispatched(args) if how == "dispatched" else _load(args)
        else:  # the model is loaded already: this entry's peak is its own, not the earlier entries'
            _reset_peak_memory(loaded[how][3])
        model, tok, adapter, device, _dtype = loaded[how]  # args._resolved: this load's device, dtype, offload
        t0 = time.perf_counter()
        seed_everything(args.seed)  # each entry as if run on its own
        metrics = _text_evaluation(name, entry, model, tok, adapter, device, args.seed)
        settings = _as_ran({"command": "evaluate-text", "task": name, "model": args.model, "device": args.device,
                            "dtype": args.dtype, "seed": args.seed, "threads": torch_threads(),
                            "offload": args.offload, "loaded": "device_map" if how == "dispatched" else "blockwise",
                            **catalog.TEXT_EVAL_DEFAULTS[name], **entry}, args)
        _finish(str(Path(args.out_dir) / f"{name}.json"), {"task": name, "metrics": metrics}, settings,
                {"model": args.model}, t0, device)


def _reset_peak_memory(device: torch.device) -> None:
    from ecoflap.utils.runtime import reset_peak_rss

    reset_peak_rss()
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def cmd_aggregate(args: argparse.Namespace) -> None:
    from ecoflap.reporting.aggregate import aggregate

    aggregate(Path(args.results), args.rows, Path(args.out_dir), Path(args.reference) if args.reference else None,
              args.model_name, read_json(args.run_config) if args.run_config else None)


def cmd_seed_summary(args: argparse.Namespace) -> None:
    from ecoflap.reporting.seed_groups import seed_group_summary

    seed_group_summary(Path(args.results), args.group, args.members, read_json(args.run_config), Path(args.out_dir))


def cmd_paper(args: argparse.Namespace) -> None:
    """Every paper config: planned (--dry-run), run one after another, or only the page."""
    from ecoflap.reporting.paper import load_manifest, write_paper_page
    from ecoflap.utils.snakemake_runs import dry_run_all, run_all

    manifest = load_manifest(args.manifest)
    tables = {k: v for k, v in manifest["tables"].items() if not args.only or k in args.only}
    unknown = sorted(set(args.only or []) - set(manifest["tables"]))
    if unknown:
        raise ValueError(f"--only {unknown}: not in {args.manifest} (tables: {', '.join(manifest['tables'])})")
    extra = [a for a in args.snakemake_args if a != "--"]
    if args.dry_run:
        plans = dry_run_all({k: t["config"] for k, t in tables.items()}, extra)
        for name, jobs in plans.items():
            counts = ", ".join(f"{rule} {n}" for rule, n in jobs.items() if rule not in ("total", "all"))
            print(f"{name:18s} {jobs.get('total', 0):5d} jobs  ({counts})")
        print(f"{'all tables':18s} {sum(j.get('total', 0) for j in plans.values()):5d} jobs", flush=True)
        return
    if not args.report:
        run_all({k: t["config"] for k, t in tables.items()}, extra)
    df = write_paper_page(manifest, Path(args.results), Path(args.out))
    print(f"{args.out}/index.md: {len(df)} published numbers, ours for {int(df['ours'].notna().sum())}")


def cmd_catalog(args: argparse.Namespace) -> None:
    if args.schema:
        from ecoflap.config import schema

        print(json.dumps(schema(), indent=1))
    else:
        print(catalog.describe())


def cmd_benchmark_scoring(args: argparse.Namespace) -> None:
    from ecoflap.benchmark import benchmark_scoring, format_summary, write_summary

    summary = benchmark_scoring(args.model, args.n_samples, args.seq_len, args.batch_size, args.seeds,
                                args.sparsities, args.device, args.threads or torch_threads(),
                                args.eval_dataset, args.eval_seq_len, args.eval_windows)
    print(format_summary(summary))
    if args.out:
        write_summary(args.out, summary)


# --- argument parsing ---------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="folder that from_pretrained loads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--family", default=None, choices=list(catalog.FAMILIES),
                   help="the config's family for this model: checked against the checkpoint before anything runs")
    p.add_argument("--offload", default="none", choices=list(catalog.OFFLOAD_MODES),
                   help="none: the whole model on the device; cpu: blocks wait in host memory and visit the "
                        "device one at a time; disk: blocks are read from the checkpoint when reached; auto: none "
                        "when the model fits the device, else cpu when it fits host memory, else disk")
    p.add_argument("--activations", default="auto", choices=list(catalog.ACTIVATION_PLACES),
                   help="where calibration activations wait between blocks: device, cpu (host memory), or auto "
                        "(cpu on a GPU when they would take over 30%% of its free memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", type=int, default=0,
                   help="lease this many GPUs of those visible before starting (a lock per device, so concurrent "
                        "jobs never share one) and narrow CUDA_VISIBLE_DEVICES to them; 0: no lease")


SPEC_HELP = ("the stage's config entry as JSON (or @file): %s. Flags given by hand override its keys; what "
             "neither sets takes the catalog's default (python -m ecoflap catalog)")


def _calib_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--calibration", required=required, help="calibration .safetensors")
    p.add_argument("--n-samples", type=int, default=None, help="use the first N windows (default all)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecoflap", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="fetch a hub model or convert the embedded one")
    p.add_argument("--spec", required=True, help='JSON model spec, e.g. {"source": "embedded", "name": "smollm2-135m"}')
    p.add_argument("--out", required=True)
    p.add_argument("--layout", required=True, help="JSON file listing prunable layers and sizes")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("calibrate", help="build seeded calibration windows")
    p.add_argument("--model", required=True)
    p.add_argument("--spec", help=SPEC_HELP % "calibration:, with the model's overrides merged")
    p.add_argument("--source", choices=list(catalog.CALIBRATION_SOURCES),
                   help="text: c4 or an embedded text (austen-emma); image-caption pairs: cc3m, coco or the "
                        "embedded fashion-mnist")
    p.add_argument("--pairs", help="cc3m: TSV/CSV/JSONL of image paths and captions, or webdataset .tar shards")
    p.add_argument("--image-root", help="cc3m: folder the pair list's relative image paths start from")
    p.add_argument("--captions", help="coco: captions_train2017.json")
    p.add_argument("--image-dir", help="coco: the train2017 image folder")
    p.add_argument("--cache-dir", help="cc3m webdataset: where sampled images are extracted")
    p.add_argument("--train-dir", help="imagenet: the training images, one folder per wnid (image classifiers)")
    p.add_argument("--root", help="coop: the folder holding the CoOp data sets (caltech-101/, dtd/, ...)")
    p.add_argument("--dataset", help="coop: which data set's train split (caltech101, dtd, ..., imagenet)")
    p.add_argument("--prompt", help="text before the caption (image-caption calibration; default none)")
    p.add_argument("--protocol", choices=list(catalog.CAPTION_PROTOCOLS),
                   help="image-caption calibration: caption (random pairs, prompt + caption as target), ecoflap "
                        "(the authors' BLIP-2 pruners: first pairs in file order, random prefix split, crop/flip) "
                        "or coop (their CLIP runs: train-time crop/flip, captions padded to CLIP's 77 tokens)")
    p.add_argument("--max-txt-len", type=int, help="ecoflap protocol: tokens per prefix and target (default 32)")
    p.add_argument("--n-samples", type=int)
    p.add_argument("--seq-len", type=int, help="tokens per text window (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("score", help="coarse stage: block/layer importance scores")
    _model_args(p)
    _calib_args(p)
    p.add_argument("--spec", help=SPEC_HELP % "a scorers: entry (kind and its options)")
    p.add_argument("--kind", choices=list(catalog.SCORERS))
    p.add_argument("--granularity", choices=["block", "layer"])
    p.add_argument("--eps", type=float)
    p.add_argument("--reuse-block-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="zeroth-order: re-run only from the perturbed block")
    p.add_argument("--perturb", choices=["unit", "tensor"],
                   help="zeroth-order: one direction per scored unit, or per weight tensor summed into its block "
                        "(the authors' BLIP-2 runs)")
    p.add_argument("--reduce", choices=["l2", "projection", "abs_g", "abs_wg"],
                   help="gradient reduction (first_order: abs_g/abs_wg; checkpointed: any)")
    p.add_argument("--owl-m", type=float, help="outliers: the option m")
    p.add_argument("--targets", type=float, nargs="+", help="atp_search: the target sparsities to search for")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("allocate", help="per-layer sparsity ratios")
    p.add_argument("--layout", required=True)
    p.add_argument("--spec", help=SPEC_HELP % "a methods: entry (allocation and its options, scope, submodels)")
    p.add_argument("--kind", choices=list(catalog.ALLOCATIONS), help="the allocation (default uniform)")
    p.add_argument("--scores")
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--max-sparsity-offset", type=float)
    p.add_argument("--aggregation", choices=["sum", "avg"])
    p.add_argument("--owl-lambda", type=float)
    p.add_argument("--scope", choices=["global", "submodel"],
                   help="one keep budget across the whole model (paper default) or one per sub-model")
    p.add_argument("--submodels", nargs="*", default=None, choices=list(catalog.SUBMODELS),
                   help="prune only these sub-models; the rest stay dense")
    p.add_argument("--out", required=True)
    p.add_argument("--plot")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("prune", help="fine stage: sequential layer-wise pruning")
    _model_args(p)
    _calib_args(p, required=False)
    p.add_argument("--spec", help=SPEC_HELP % "the pruning: entry plus the method's pruner")
    p.add_argument("--allocation", required=True)
    p.add_argument("--pruner", choices=list(catalog.PRUNERS))
    p.add_argument("--nm", default=None, help="N:M pattern such as 2:4 (overrides the ratios)")
    p.add_argument("--comparison", nargs="*", default=None, metavar="SUBMODEL=GROUP",
                   help="magnitude/Wanda: compare scores within each output row (default) or over the whole matrix "
                        "for a sub-model, e.g. vision=matrix (the authors' BLIP-2 ViT)")
    p.add_argument("--sparsegpt-damp", type=float)
    p.add_argument("--sparsegpt-block-size", type=int)
    p.add_argument("--refine", choices=[catalog.NO_REFINE, *catalog.REFINERS],
                   help="refine each layer's mask after the pruner, at the same sparsity (dsnot)")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--report", required=True, help="JSON with achieved sparsities")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("evaluate", help="one evaluation: perplexity, lm-eval tasks or a vision-language task")
    _model_args(p)
    p.add_argument("--task", choices=[*catalog.TEXT_EVALS, *catalog.VL_TASKS], required=True)
    p.add_argument("--spec", help=SPEC_HELP % "an evaluation: entry (a vision-language entry: dataset, paths, prompt, "
                                              "generation settings, limit, batch_size)")
    p.add_argument("--dataset", help="perplexity: one of " + ", ".join(catalog.PERPLEXITY_DATASETS))
    p.add_argument("--seq-len", type=int)
    p.add_argument("--max-windows", type=int)
    p.add_argument("--tasks", nargs="*", help="lm-eval task names")
    p.add_argument("--limit", type=int)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluate-text", help="all text evaluations of a checkpoint in one process")
    _model_args(p)
    p.add_argument("--spec", required=True,
                   help='JSON of the config\'s text evaluation entries, e.g. {"perplexity": {"dataset": '
                        '"brown-heldout", "seq_len": 256, "max_windows": 32, "batch_size": 8}, "lm_eval": {"tasks": '
                        '["brown_cloze"], "limit": null, "num_fewshot": 0, "batch_size": 16}}')
    p.add_argument("--out-dir", required=True, help="writes {entry}.json here for each entry")
    p.set_defaults(func=cmd_evaluate_text)

    p = sub.add_parser("aggregate", help="tables and plots over methods and sparsities")
    p.add_argument("--results", required=True, help="results/{model}")
    p.add_argument("--rows", nargs="+", required=True, help="method/sparsity folders to include")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--reference", help="YAML of published numbers to print beside ours")
    p.add_argument("--model-name", help="the model's key in the reference YAML (default: the results folder name)")
    p.add_argument("--run-config", help="JSON of the workflow configuration, copied into environment.txt")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("seed-summary", help="mean and spread over models that differ only in seed (seed_groups)")
    p.add_argument("--results", default="results", help="the folder holding results/<model>/")
    p.add_argument("--group", required=True, help="the seed group's name")
    p.add_argument("--members", nargs="+", required=True, help="its models (each aggregated already)")
    p.add_argument("--run-config", required=True, help="JSON of the workflow configuration (methods, scorers, seeds)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_seed_summary)

    p = sub.add_parser("paper", help="every table of the paper: plan (--dry-run), run, and the page beside the "
                                     "published numbers (results/paper/index.md)")
    p.add_argument("--manifest", default="config/paper.yaml", help="the tables and figures, a config each")
    p.add_argument("--dry-run", action="store_true", help="plan every table (snakemake -n), print the jobs per table")
    p.add_argument("--report", action="store_true", help="only write the page from what results/ holds")
    p.add_argument("--only", nargs="+", help="these tables of the manifest only")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="results/paper")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                   help="after --: passed to every snakemake call (e.g. -- --cores 8, or --profile profiles/slurm)")
    p.set_defaults(func=cmd_paper)

    p = sub.add_parser("catalog", help="every scorer, allocation, pruner, family, source and dataset, with defaults")
    p.add_argument("--schema", action="store_true", help="print the complete config JSON schema instead")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("benchmark-scoring", help="paper vs fast coarse stage: time, memory, quality ratios")
    p.add_argument("--model", required=True)
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.7])
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-dataset", default="brown-heldout")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", default=None, help="JSON summary (a .txt copy of the printout goes beside it)")
    p.set_defaults(func=cmd_benchmark_scoring)
    return parser


def _take_gpu_lease(args: argparse.Namespace) -> None:
    """Before torch is imported: the lease narrows CUDA_VISIBLE_DEVICES to this job's devices."""
    if not getattr(args, "gpus", 0):
        return
    from ecoflap.utils.leases import lease_for_job

    if lease_for_job(args.gpus, args.device, what=f"{args.command} {getattr(args, 'out', '')}"):
        if args.device.startswith("cuda:"):
            log.info("device %s: the lease renumbers the job's devices from 0; using cuda:0", args.device)
            args.device = "cuda:0"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    log.info("ecoflap %s", args.command)
    try:
        _take_gpu_lease(args)
        if args.threads and args.command in MODEL_STAGES:
            import torch

            torch.set_num_threads(args.threads)
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError, FloatingPointError, MemoryError) as exc:
        # expected failures (bad input, missing prerequisite, numerical guard): the traceback goes
        # to the log for debugging, the last line says what to do
        log.debug("traceback", exc_info=True)
        log.error("%s failed: %s", args.command, exc)
        raise SystemExit(1) from None
