"""What a model-running job asks its scheduler for, from the model's size: host memory
(`mem_mb`), wall time (`runtime`, minutes) and, for the record, the GPU memory it will use.
The SLURM profile passes these on (--mem, --time); locally Snakemake counts mem_mb against
`--resources mem_mb=...`. Torch-free: the rules evaluate it while planning.

The model's size is read from its downloaded folder (the safetensors files' bytes and the
dtype config.json records), so a job's request is known once the download has run; before
that Snakemake shows it as <TBD>.

Formulas (W: the weights' bytes in the run's dtype; B: one block's prunable bytes; O: the
bytes outside the blocks (embeddings, heads); T: calibration or evaluation tokens; G: 2^30):
  host memory, GPU jobs       W + 3 G                (weights load on the host first; the rest
                                                       is the interpreter, torch and CUDA)
  host memory, CPU jobs       W x f_stage + 3 G      f: score 2.5 (weights, gradients,
                                                       activations), prune 1.6 (a pruner's
                                                       working copy, the saved checkpoint),
                                                       evaluate 1.3
  host memory, offload disk   O + 2 B x f_stage + 3 G  (one block read at a time; two during a
                                                       backward)
  GPU memory, offload none    W x (1 + g_stage) + 2 G    g: score 0.5, prune 0.3, evaluate 0.2
  GPU memory, offload cpu     O + 2 B x (1 + g_stage) + 2 G   (and offload disk)
  runtime                     10 min + r_stage x P x (params / 1e9) x (T / 1e6) x attempt
                              r (minutes per billion parameters per million tokens): on a GPU
                              score 6, prune 4 (SparseGPT 12), evaluate 2; on CPUs x 250.
                              P: 1, except for scoring, where it is the scorer's cost in
                              first-order passes (score_passes)
Each is a ceiling, rounded up; a retry (attempt 2) asks for twice the memory and time.
Overrides: config `resources: {mem_mb, runtime}` (every model-running job) and
`resources: {by_rule: {<stage>: {mem_mb, runtime}}}`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
HOST_FACTOR = {"score": 2.5, "prune": 1.6, "evaluate": 1.3}
GPU_EXTRA = {"score": 0.5, "prune": 0.3, "evaluate": 0.2}
MINUTES_PER_B_PER_M_TOKENS = {"score": 6.0, "prune": 4.0, "prune_sparsegpt": 12.0, "evaluate": 2.0}
# one CPU thread against the GPU rates, from SmolLM2-135M on an AMD EPYC thread: a first-order
# pass over 16 x 128 tokens took 21 s (211 x the score rate), a Wanda prune over 64 x 128 tokens
# 57 s (215 x), SparseGPT 102 s (128 x). The 40 assumed before gave ATP's search 14 minutes; it ran 15.4
CPU_SLOWDOWN = 250.0
FIXED_HOST = 3 * GIB
FIXED_GPU = 2 * GIB
MIN_RUNTIME = 10


def model_size(model_dir: str | Path, layout_path: str | Path) -> tuple[int, int, int]:
    """(all parameters, prunable parameters, blocks) of a downloaded model: the first from the
    safetensors files' bytes and the dtype config.json records, the others from layout.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    saved = config.get("dtype") or config.get("torch_dtype") or "float32"
    on_disk = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    layout = json.loads(Path(layout_path).read_text())["layout"]
    prunable = sum(n for block in layout.values() for n in block.values())
    return max(on_disk // DTYPE_BYTES.get(saved, 4), prunable), prunable, len(layout)


def layout_counts(layout_path: str | Path) -> tuple[int, int]:
    """(prunable layers, blocks of the largest sub-model) from layout.json: what a scorer's
    number of passes depends on."""
    laid_out = json.loads(Path(layout_path).read_text())
    layers = sum(len(block) for block in laid_out["layout"].values())
    submodel_of_block = laid_out.get("submodel_of_block") or {b: "language" for b in laid_out["layout"]}
    per_submodel: dict[str, int] = {}
    for submodel in submodel_of_block.values():
        per_submodel[submodel] = per_submodel.get(submodel, 0) + 1
    return layers, max(per_submodel.values())


def score_passes(scorer: dict, blocks: int, layers: int, longest: int, targets: list[float]) -> float:
    """A scorer's cost in first-order passes (one forward and backward over its calibration
    windows), from SmolLM2-135M's scores on one CPU thread (results/<model>/scores/benchmarks,
    16 windows of 128): first_order 21 s; checkpointed 61 s (x 3: every block's forward twice and
    its backward); outliers 7 s per 16 windows; zeroth_order 320 s over 30 blocks (x 0.5 per
    unit reusing block inputs: two forwards from the perturbed block on; x 1 per unit without);
    atp_search 921 s for 40 prune-and-measure runs (x 1.1 per run; 1.5 here, a ceiling)."""
    kind = scorer["kind"]
    if kind == "zeroth_order":
        units = layers if scorer.get("granularity") == "layer" or scorer.get("perturb") == "tensor" else blocks
        return units * (0.5 if scorer.get("reuse_block_inputs", True) else 1.0)
    if kind == "checkpointed":
        return 3.0
    if kind == "atp_search":
        # their grid: step, 2 step, ... below min(2 t, 2 (1 - t)) / (L - 1) (allocators.atp_max_step)
        step, span = scorer.get("step", 0.002), max(longest - 1, 1)
        runs = sum(int(2 * min(t, 1 - t) / span / step) for t in targets)
        return 1.0 + 1.5 * runs
    return 1.0  # first_order; outliers and esd_alpha cost less


def estimate(stage: str, params: int, prunable: int, blocks: int, dtype: str, on_gpu: bool, offload: str,
             tokens: int, pruner: str | None = None, attempt: int = 1, passes: float = 1.0) -> dict[str, int]:
    """{mem_mb, runtime, gpu_mem_mb} of one job (see the module docstring for the formulas);
    `passes`: a scoring job's cost in first-order passes (score_passes)."""
    if stage not in HOST_FACTOR:
        raise ValueError(f"stage must be one of {', '.join(HOST_FACTOR)}, got {stage!r}")
    w = params * DTYPE_BYTES[dtype]
    block = prunable * DTYPE_BYTES[dtype] / blocks
    outside = w - prunable * DTYPE_BYTES[dtype]
    if offload == "disk":
        host = outside + 2 * block * HOST_FACTOR[stage] + FIXED_HOST
    else:
        host = (w + FIXED_HOST) if on_gpu else (w * HOST_FACTOR[stage] + FIXED_HOST)
    if offload in ("cpu", "disk"):
        gpu = outside + 2 * block * (1 + GPU_EXTRA[stage]) + FIXED_GPU
    else:
        gpu = w * (1 + GPU_EXTRA[stage]) + FIXED_GPU
    rate = MINUTES_PER_B_PER_M_TOKENS["prune_sparsegpt" if pruner == "sparsegpt" else stage]
    if not on_gpu:
        rate *= CPU_SLOWDOWN
    runtime = MIN_RUNTIME + rate * passes * params / 1e9 * tokens / 1e6
    return {"mem_mb": math.ceil(host * attempt / 2**20), "runtime": math.ceil(runtime * attempt),
            "gpu_mem_mb": math.ceil(gpu / 2**20) if on_gpu else 0}
