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
  runtime                     10 min + r_stage x (params / 1e9) x (T / 1e6) x attempt
                              r (minutes per billion parameters per million tokens): on a GPU
                              score 6, prune 4 (SparseGPT 12), evaluate 2; on CPUs x 40
Each is a ceiling, rounded up; a retry (attempt 2) asks for twice the memory and time.
Overrides: config `resources_by_rule: {rule: {mem_mb, runtime}}`, and per model
`models.<name>.resources`.
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
CPU_SLOWDOWN = 40.0
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


def estimate(stage: str, params: int, prunable: int, blocks: int, dtype: str, on_gpu: bool, offload: str,
             tokens: int, pruner: str | None = None, attempt: int = 1) -> dict[str, int]:
    """{mem_mb, runtime, gpu_mem_mb} of one job (see the module docstring for the formulas)."""
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
    runtime = MIN_RUNTIME + rate * params / 1e9 * tokens / 1e6
    return {"mem_mb": math.ceil(host * attempt / 2**20), "runtime": math.ceil(runtime * attempt),
            "gpu_mem_mb": math.ceil(gpu / 2**20) if on_gpu else 0}
