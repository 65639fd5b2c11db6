"""Calibration windows: fixed-length token windows drawn with a fixed seed, saved once
(as safetensors, with the tokenizer's and source's identity) and reused by every method.
Saving, loading and batching serve the image-caption sets (`models/image_calibration.py`, which
encodes pairs with a family's processors) too."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from ecoflap.data.corpora import c4_documents, embedded_text
from ecoflap.utils.io import load_tensors, save_tensors

log = logging.getLogger(__name__)


def windows_from_text(tokenizer: Any, text: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random windows from one long text (the embedded corpus)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seq_len + 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def windows_from_documents(tokenizer: Any, docs: list[str], n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Wanda's C4 sampling: a random document longer than the window, then a random window in it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_samples):
        for _attempt in range(10_000):
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
            if ids.numel() > seq_len:
                break
        else:
            raise ValueError(f"no document longer than {seq_len} tokens found")
        start = rng.randint(0, ids.numel() - seq_len - 1)
        out.append(ids[start:start + seq_len])
    return torch.stack(out)


def build_calibration(tokenizer: Any, source: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    log.info("building %d calibration windows of %d tokens from %s (seed %d)", n_samples, seq_len, source, seed)
    if source == "c4":
        return windows_from_documents(tokenizer, c4_documents(), n_samples, seq_len, seed)
    return windows_from_text(tokenizer, embedded_text(source), n_samples, seq_len, seed)


def save_calibration(path: str | Path, input_ids: torch.Tensor, meta: dict[str, str]) -> None:
    save_tensors(path, {"input_ids": input_ids}, metadata=meta)


def load_calibration(path: str | Path, n_samples: int | None = None) -> dict[str, torch.Tensor]:
    """The first `n_samples` calibration samples (stages needing fewer than were built take a
    prefix): {"input_ids"} for text, plus pixel values, masks and labels for image-caption sets."""
    data = load_tensors(path)
    ids = data.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"{path} does not hold an int64 [n, seq_len] 'input_ids' tensor; delete it and rerun calibration")
    if any(t.shape[0] != ids.shape[0] for t in data.values()):
        raise ValueError(f"{path} holds tensors with different sample counts; delete it and rerun calibration")
    if n_samples is not None:
        if n_samples > ids.shape[0]:
            raise ValueError(f"{n_samples} calibration samples asked for but {path} holds {ids.shape[0]}; "
                             "raise calibration.n_samples in config.yaml")
        data = {k: t[:n_samples] for k, t in data.items()}
    return data


def batches(data: torch.Tensor | dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split samples into batches of keyword arguments (a bare tensor is taken as input_ids)."""
    if isinstance(data, torch.Tensor):
        data = {"input_ids": data}
    n = next(iter(data.values())).shape[0]
    return [{k: t[i:i + batch_size] for k, t in data.items()} for i in range(0, n, batch_size)]
