"""Command line: one subcommand per pipeline stage. Each Snakemake rule calls one of these;
they are just as usable by hand (`python -m ecoflap prune --help`)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from ecoflap.utils.io import provenance, read_json, write_json
from ecoflap.utils.validate import check_allocation, check_layout, check_scores
from ecoflap.utils.runtime import (peak_memory_mb, resolve_device, resolve_dtype, seed_everything, setup_logging,
                                   torch_threads)

if TYPE_CHECKING:
    import torch

# torch is imported inside the stages that run a model: allocate and aggregate never need it, and
# importing it (with transformers) is most of a short job's time.
MODEL_STAGES = ("calibrate", "score", "prune", "evaluate", "evaluate-text", "download", "benchmark-scoring")

log = logging.getLogger("ecoflap")


def _load(args: argparse.Namespace):
    from ecoflap.models.adapters import adapter_for
    from ecoflap.models.loading import load_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    log.info("loading %s on %s as %s (offload %s)", args.model, device, dtype, args.offload)
    model, tok = load_model(args.model, device, dtype, trust_remote_code=args.trust_remote_code,
                            offload=args.offload)
    return model, tok, adapter_for(model), device, dtype


def _calibration_batches(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Batches of model keyword arguments; pixel values in the model's dtype."""
    from ecoflap.data.calibration import batches, load_calibration

    data = load_calibration(args.calibration, args.n_samples)
    data = {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}
    return batches(data, args.batch_size)


def _finish(path: str, result: dict[str, Any], args: argparse.Namespace | dict[str, Any], inputs: dict[str, str],
            started: float, device: torch.device | None = None) -> None:
    settings = args if isinstance(args, dict) else {k: v for k, v in vars(args).items() if k not in ("func",)}
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
    spec = json.loads(args.spec)
    fetch_model(spec, args.out)
    laid_out = layout_of_folder(args.out, spec.get("trust_remote_code", False))
    layout = laid_out["layout"]
    n = sum(sum(v.values()) for v in layout.values())
    log.info("%s: %d blocks, %d prunable layers, %.1f M prunable weights", laid_out["family"], len(layout),
             sum(len(v) for v in layout.values()), n / 1e6)
    _finish(args.layout, {"spec": spec, **laid_out, "prunable_weights": n}, args, {}, t0)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from ecoflap.data.calibration import build_calibration, build_image_caption_calibration, save_calibration
    from ecoflap.models.families import IMAGE_SOURCES
    from ecoflap.utils.io import save_tensors

    t0 = time.perf_counter()
    meta = {"source": args.source, "seed": str(args.seed)}
    inputs = {"model": args.model}
    if args.source in IMAGE_SOURCES:
        paths = {k: v for k, v in (("pairs", args.pairs), ("image_root", args.image_root), ("captions", args.captions),
                                   ("image_dir", args.image_dir), ("cache_dir", args.cache_dir)) if v}
        data = build_image_caption_calibration(args.model, args.source, args.n_samples, args.seed, paths, args.prompt,
                                               args.protocol, args.max_txt_len)
        save_tensors(args.out, data, metadata={**meta, "prompt": args.prompt, "protocol": args.protocol})
        inputs.update({k: v for k, v in paths.items() if k in ("pairs", "captions") and Path(v).is_file()})
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        data = {"input_ids": build_calibration(tok, args.source, args.n_samples, args.seq_len, args.seed)}
        save_calibration(args.out, data["input_ids"], {**meta, "seq_len": str(args.seq_len)})
    inputs["calibration"] = args.out
    _finish(args.out + ".json", {"shapes": {k: list(v.shape) for k, v in data.items()}}, args, inputs, t0)


def cmd_score(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    seed_everything(args.seed)
    model, _tok, adapter, device, dtype = _load(args)
    batches = _calibration_batches(args, dtype)
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    if args.kind == "zeroth_order":
        from ecoflap.scoring.zeroth_order import zeroth_order_scores
        scores = zeroth_order_scores(model, adapter, batches, device, eps=args.eps, granularity=args.granularity,
                                     reuse_block_inputs=args.reuse_block_inputs, seed=args.seed, perturb=args.perturb)
    elif args.kind == "first_order":
        from ecoflap.scoring.first_order import first_order_scores
        scores = first_order_scores(model, adapter, batches, device, args.granularity, args.reduce)
    elif args.kind == "checkpointed":
        from ecoflap.scoring.checkpointed import checkpointed_gradient_scores
        scores = checkpointed_gradient_scores(model, adapter, batches, device, args.granularity, args.reduce,
                                              seed=args.seed)
    else:
        from ecoflap.scoring.outliers import outlier_ratios
        scores = outlier_ratios(model, adapter, batches, device, m=args.owl_m)
    granularity = "block" if args.kind == "outliers" else args.granularity
    _finish(args.out, {"kind": args.kind, "granularity": granularity, "scores": scores}, args,
            {"model": args.model, "calibration": args.calibration}, t0, device)


def cmd_allocate(args: argparse.Namespace) -> None:
    from ecoflap.allocation import ratios
    from ecoflap.reporting.plots import plot_allocation

    t0 = time.perf_counter()
    laid_out = check_layout(read_json(args.layout), args.layout)
    submodel_of_block = laid_out.get("submodel_of_block") or {b: "language" for b in laid_out["layout"]}
    layout = ratios.select_submodels(laid_out["layout"], submodel_of_block, args.submodels)
    inputs = {"layout": args.layout}
    scored = {"granularity": "block", "scores": {}}
    if args.kind != "uniform":
        if not args.scores:
            raise SystemExit(f"allocation {args.kind} needs --scores")
        inputs["scores"] = args.scores
        scored = read_json(args.scores)
        units = set(ratios.unit_sizes(laid_out["layout"], scored.get("granularity", "block")))
        check_scores(scored, args.scores, units)
    sizes = ratios.unit_sizes(layout, scored["granularity"])
    scores = {u: scored["scores"][u] for u in sizes} if args.kind != "uniform" else {u: 0.0 for u in sizes}
    block_of_unit = {u: next(b for b in layout if u == b or u.startswith(b + ".")) for u in sizes}
    group_of_unit = {u: submodel_of_block[block_of_unit[u]] if args.scope == "submodel" else "all" for u in sizes}

    def allocate(sc: dict[str, float], sz: dict[str, int]) -> dict[str, float]:
        if args.kind == "uniform":
            return ratios.uniform(sz, args.target)
        if args.kind == "ecoflap":
            max_sparsity = min(args.target + args.max_sparsity_offset, 1.0)
            return ratios.ecoflap(sc, sz, args.target, max_sparsity, args.aggregation)
        return ratios.owl(sc, args.target, args.owl_lambda)

    unit = ratios.per_group(allocate, scores, sizes, group_of_unit)
    per_layer = ratios.expand_to_layers(unit, layout)
    layer_sizes = {k: n for v in layout.values() for k, n in v.items()}
    planned = sum(per_layer[k] * layer_sizes[k] for k in layer_sizes) / sum(layer_sizes.values())
    submodel_sparsity = ratios.sparsity_by_group(
        per_layer, layer_sizes, {k: submodel_of_block[b] for b, layers in layout.items() for k in layers})
    log.info("%s allocation (%s budget) at target %.3f: planned sparsity %.5f overall, %s; block range %.3f-%.3f",
             args.kind, args.scope, args.target, planned,
             ", ".join(f"{g} {v:.4f}" for g, v in submodel_sparsity.items()), min(unit.values()), max(unit.values()))
    if args.plot:
        plot_allocation(unit, args.plot, f"{args.kind} allocation, target {args.target}", args.target)
    _finish(args.out, {"kind": args.kind, "target": args.target, "scope": args.scope,
                       "submodels": sorted(submodel_sparsity), "planned_global_sparsity": planned,
                       "planned_submodel_sparsity": submodel_sparsity, "unit_sparsity": unit,
                       "layer_sparsity": per_layer}, args, inputs, t0)


def cmd_prune(args: argparse.Namespace) -> None:
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.masks import parse_nm
    from ecoflap.pruning.methods import make_pruner
    from ecoflap.utils.io import atomic_path, write_checksums

    t0 = time.perf_counter()
    seed_everything(args.seed)
    model, tok, adapter, device, dtype = _load(args)
    nm = parse_nm(args.nm)
    from ecoflap.models.adapters import model_layout

    layers = {layer for block in model_layout(model, adapter).values() for layer in block}
    allocation = check_allocation(read_json(args.allocation), args.allocation, layers)
    pruner = make_pruner(args.pruner, damp=args.sparsegpt_damp, block_size=args.sparsegpt_block_size)
    batches = _calibration_batches(args, dtype) if pruner.needs_activations else []
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    comparison = dict(item.split("=", 1) for item in args.comparison or [])
    report = prune_sequential(model, adapter, pruner, allocation["layer_sparsity"], batches, device, nm, comparison)
    submodel_of_layer = {layer: sub for block, sub in adapter.submodel_of_block(model).items()
                         for layer in report.layer_size if layer.startswith(block + ".")}
    submodel_sparsity = report.sparsity_by(submodel_of_layer)
    log.info("achieved sparsity by sub-model: %s", submodel_sparsity)
    log.info("saving pruned checkpoint to %s", args.out)
    # bytes the weights take on disk (a tied tensor counted once), for a full disk's message
    weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    with atomic_path(args.out, is_dir=True, expected_bytes=weight_bytes) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_checksums(tmp)
    inputs = {"model": args.model, "allocation": args.allocation}
    if pruner.needs_activations:
        inputs["calibration"] = args.calibration
    from ecoflap.utils.io import sha256_path

    _finish(args.report, {"pruner": args.pruner, "nm": args.nm, "target": allocation["target"],
                          "global_sparsity": report.global_sparsity, "submodel_sparsity": submodel_sparsity,
                          "mask_sha256": report.mask_sha256,
                          "checkpoint_sha256": sha256_path(args.out),
                          "layer_sparsity": report.layer_sparsity}, args, inputs, t0, device)


def cmd_evaluate(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    seed_everything(args.seed)
    model, tok, adapter, device, _dtype = _load(args)
    predictions = None
    if args.task in ("vqa", "caption", "retrieval", "classification"):
        from ecoflap.evaluation.vision_language import evaluate_vision_language

        spec = {**json.loads(args.spec or "{}"), "task": args.task}
        metrics, predictions = evaluate_vision_language(model, tok, adapter, spec)
    elif args.task == "perplexity":
        from ecoflap.evaluation.perplexity import evaluation_text, perplexity
        metrics = perplexity(model, tok, evaluation_text(args.dataset), args.seq_len, device,
                             args.max_windows, args.batch_size)
        metrics["dataset"] = args.dataset
    else:
        from ecoflap.evaluation.harness import run_lm_eval
        metrics = run_lm_eval(model, tok, args.tasks, args.batch_size, args.limit, args.num_fewshot, args.seed)
    result = {"task": args.task, "metrics": metrics}
    if predictions:
        result["predictions"] = predictions
    _finish(args.out, result, args, {"model": args.model}, t0, device)


def cmd_evaluate_text(args: argparse.Namespace) -> None:
    """Every text evaluation of one checkpoint (perplexity, lm-eval) from one process and one
    model load; each entry still gets its own result file, settings and wall time."""
    from ecoflap.evaluation.harness import run_lm_eval
    from ecoflap.evaluation.perplexity import evaluation_text, perplexity

    seed_everything(args.seed)
    model, tok, _adapter, device, _dtype = _load(args)
    for name, entry in json.loads(args.spec).items():
        t0 = time.perf_counter()
        seed_everything(args.seed)  # each entry as if run on its own
        if name == "perplexity":
            metrics = perplexity(model, tok, evaluation_text(entry["dataset"]), entry["seq_len"], device,
                                 entry.get("max_windows"), entry["batch_size"])
            metrics["dataset"] = entry["dataset"]
        elif name == "lm_eval":
            metrics = run_lm_eval(model, tok, entry["tasks"], entry["batch_size"], entry.get("limit"),
                                  entry["num_fewshot"], args.seed)
        else:
            raise ValueError(f"evaluate-text runs perplexity and lm_eval entries, not {name!r}")
        settings = {"command": "evaluate-text", "task": name, "model": args.model, "device": args.device,
                    "dtype": args.dtype, "seed": args.seed, "threads": torch_threads(), **entry}
        _finish(str(Path(args.out_dir) / f"{name}.json"), {"task": name, "metrics": metrics}, settings,
                {"model": args.model}, t0, device)


def cmd_aggregate(args: argparse.Namespace) -> None:
    from ecoflap.reporting.aggregate import aggregate

    aggregate(Path(args.results), args.rows, Path(args.out_dir), Path(args.reference) if args.reference else None,
              args.model_name, read_json(args.run_config) if args.run_config else None)


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
    p.add_argument("--offload", default="none", choices=["auto", "none", "cpu"],
                   help="none: the whole model on the device; cpu: blocks wait in host memory and visit the "
                        "device one at a time; auto: none when the model fits the device, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", type=int, default=0,
                   help="lease this many GPUs of those visible before starting (a lock per device, so concurrent "
                        "jobs never share one) and narrow CUDA_VISIBLE_DEVICES to them; 0: no lease")


def _calib_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--calibration", required=required, help="calibration .safetensors")
    p.add_argument("--n-samples", type=int, default=None, help="use the first N windows (default all)")
    p.add_argument("--batch-size", type=int, default=8)


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
    p.add_argument("--source", default="austen-emma",
                   help="text: c4 or an embedded text (austen-emma); image-caption pairs: cc3m, coco or the "
                        "embedded fashion-mnist")
    p.add_argument("--pairs", help="cc3m: TSV/CSV/JSONL of image paths and captions, or webdataset .tar shards")
    p.add_argument("--image-root", help="cc3m: folder the pair list's relative image paths start from")
    p.add_argument("--captions", help="coco: captions_train2017.json")
    p.add_argument("--image-dir", help="coco: the train2017 image folder")
    p.add_argument("--cache-dir", help="cc3m webdataset: where sampled images are extracted")
    p.add_argument("--prompt", default="", help="text before the caption (image-caption calibration)")
    p.add_argument("--protocol", default="caption", choices=["caption", "ecoflap"],
                   help="image-caption calibration: caption (random pairs, prompt + caption as target) or ecoflap "
                        "(the authors' BLIP-2 pruners: first pairs in file order, random prefix split, crop/flip)")
    p.add_argument("--max-txt-len", type=int, default=32, help="ecoflap protocol: tokens per prefix and target")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("score", help="coarse stage: block/layer importance scores")
    _model_args(p)
    _calib_args(p)
    p.add_argument("--kind", choices=["zeroth_order", "first_order", "checkpointed", "outliers"], required=True)
    p.add_argument("--granularity", choices=["block", "layer"], default="block")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--reuse-block-inputs", action="store_true", help="zeroth-order: re-run only from the perturbed block")
    p.add_argument("--perturb", choices=["unit", "tensor"], default="unit",
                   help="zeroth-order: one direction per scored unit, or per weight tensor summed into its block "
                        "(the authors' BLIP-2 runs)")
    p.add_argument("--reduce", choices=["l2", "projection", "abs_g", "abs_wg"], default="abs_wg",
                   help="gradient reduction (first_order: abs_g/abs_wg; checkpointed: any)")
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("allocate", help="per-layer sparsity ratios")
    p.add_argument("--layout", required=True)
    p.add_argument("--kind", choices=["uniform", "ecoflap", "owl"], required=True)
    p.add_argument("--scores")
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--max-sparsity-offset", type=float, default=0.1)
    p.add_argument("--aggregation", choices=["sum", "avg"], default="sum")
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--scope", choices=["global", "submodel"], default="global",
                   help="one keep budget across the whole model (paper default) or one per sub-model")
    p.add_argument("--submodels", nargs="*", default=None,
                   help="prune only these sub-models (vision, qformer, language); the rest stay dense")
    p.add_argument("--out", required=True)
    p.add_argument("--plot")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("prune", help="fine stage: sequential layer-wise pruning")
    _model_args(p)
    _calib_args(p, required=False)
    p.add_argument("--allocation", required=True)
    p.add_argument("--pruner", choices=["magnitude", "wanda", "sparsegpt"], required=True)
    p.add_argument("--nm", default=None, help="N:M pattern such as 2:4 (overrides the ratios)")
    p.add_argument("--comparison", nargs="*", default=None, metavar="SUBMODEL=GROUP",
                   help="magnitude/Wanda: compare scores within each output row (default) or over the whole matrix "
                        "for a sub-model, e.g. vision=matrix (the authors' BLIP-2 ViT)")
    p.add_argument("--sparsegpt-damp", type=float, default=0.01)
    p.add_argument("--sparsegpt-block-size", type=int, default=128)
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--report", required=True, help="JSON with achieved sparsities")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("evaluate", help="perplexity or lm-eval tasks")
    _model_args(p)
    p.add_argument("--task", choices=["perplexity", "lm_eval", "vqa", "caption", "retrieval", "classification"],
                   required=True)
    p.add_argument("--spec", help="vision-language tasks: JSON of the config's evaluation entry (dataset, paths, "
                                  "prompt, generation settings, limit, batch_size)")
    p.add_argument("--dataset", default="brown-heldout", help="perplexity: wikitext2 or brown-heldout")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--tasks", nargs="*", default=["brown_cloze"], help="lm-eval task names")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
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
