"""Device, dtype, seeding, logging and peak-memory helpers.

torch and numpy are imported inside the functions that need them: the stages that never run a
model (allocate, aggregate) share this module and start in a fraction of a second without them."""
from __future__ import annotations

import logging
import random
import resource
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch  # only once called: the CLI imports this module before it knows whether the stage needs torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_device(name: str = "auto") -> torch.device:
    import torch  # only once called: the CLI imports this module before it knows whether the stage needs torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; set device: auto or cpu in config.yaml")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPU (fp16 when the GPU lacks bf16), fp32 on CPU."""
    import torch  # only once called: the CLI imports this module before it knows whether the stage needs torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} unknown; use one of auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def seed_everything(seed: int) -> None:
    import numpy as np  # only once called (see resolve_device)
    import torch  # only once called: the CLI imports this module before it knows whether the stage needs torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(verbose: bool = True) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger("ecoflap")


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MB."""
    if device is not None and device.type == "cuda":
        import torch  # only once called: the CLI imports this module before it knows whether the stage needs torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def check_finite(t: torch.Tensor, what: str, hint: str) -> None:
    """Stop with a message naming the stage/block instead of letting NaN/Inf reach a mask."""
    import torch  # only once called: the CLI imports this module before it knows whether the stage needs torch

    if not torch.isfinite(t).all():
        raise FloatingPointError(f"non-finite values in {what}; {hint}")


def torch_threads() -> int | None:
    """torch's intra-op threads, or None in a process that never imported torch."""
    return sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None


def reset_peak_rss() -> None:
    """Reset this process's peak-RSS counter (Linux VmHWM), so a phase's peak excludes what
    came before it (e.g. the transient copy made while loading weights)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss (VmHWM), in MB; falls back to ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
