"""Calibration windows: fixed-length token windows drawn with a fixed seed, saved once
(as safetensors, with the tokenizer's and source's identity) and reused by every method.
Encoder-decoder models get each sample as an encoder input and a decoder target
(`seq2seq_calibration`).
Saving, loading and batching serve the image-caption sets (`models/image_calibration.py`, which
encodes pairs with a family's processors) too."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from ecoflap.data.captions import blip_pre_caption
from ecoflap.data.corpora import C4_VALIDATION_SHARD, c4_documents, embedded_paragraphs, embedded_text
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


def seq2seq_calibration(tokenizer: Any, source: str, n_samples: int, seq_len: int, seed: int, protocol: str,
                        max_txt_len: int) -> dict[str, torch.Tensor]:
    """Encoder inputs and decoder targets: {"input_ids", "attention_mask", "labels"}, padded
    to the longest sample (labels at -100 there, so neither the loss nor the statistics see it).

    protocol "ecoflap", as the authors' FlanT5 pruner builds it (ylsung/ECoFLaP, LAVIS
    c4_dataset.py and t5_models/t5.py): the first `n_samples` documents in file order (C4's
    validation shard 00000-of-00008; the embedded text: its paragraphs of 20 words or more),
    each through BLIP's pre_caption (lower case, punctuation dropped, 50 words), split at a
    random character 1 .. len // 2 into an encoder prefix and a target, each tokenised with
    the tokenizer's special tokens (T5 closes each with </s>) and cut to `max_txt_len` tokens.
    protocol "caption" (the plain one): `seq_len`-token windows drawn as for a causal LM, the
    first half to the encoder and the second half as the target, each closed by the
    end-of-sequence token."""
    rng = random.Random(seed)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if protocol == "ecoflap":
        docs = c4_documents(C4_VALIDATION_SHARD, split="validation") if source == "c4" else embedded_paragraphs(source)
        if len(docs) < n_samples:
            raise ValueError(f"{source} has {len(docs)} documents, fewer than calibration.n_samples = {n_samples}")
        log.info("building %d prefix/target pairs from the first %d documents of %s (seed %d, protocol ecoflap)",
                 n_samples, n_samples, source, seed)
        prefixes, targets = [], []
        for doc in docs[:n_samples]:
            text = blip_pre_caption(doc)
            if len(text) < 2:
                raise ValueError(f"calibration document {doc[:80]!r} is too short to split into a prefix and a target")
            split = rng.randint(1, len(text) // 2)
            prefixes.append(tokenizer(text[:split], truncation=True, max_length=max_txt_len).input_ids)
            targets.append(tokenizer(text[split:], truncation=True, max_length=max_txt_len).input_ids)
    elif protocol == "caption":
        windows = build_calibration(tokenizer, source, n_samples, seq_len, seed).tolist()
        prefixes = [w[:seq_len // 2] + eos for w in windows]
        targets = [w[seq_len // 2:] + eos for w in windows]
    else:
        raise ValueError(f"unknown calibration protocol {protocol!r} (allowed: caption, ecoflap)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"input_ids": pad_rows(prefixes, pad), "attention_mask": mask_rows(prefixes), "labels": pad_rows(targets, -100)}


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Token-id rows of different lengths as one [rows, longest] tensor, `value` after each row."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def widen_clear_of(ids: torch.Tensor, mask: torch.Tensor, taken: set[int], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token ids and their mask, with padding columns added until the width is none of
    `taken`. A statistics mask is matched to a layer's input by its [batch, width] shape, so a text
    width equal to another input's of the same stack (BLIP-2's queries, its ViT tokens) would mask
    real positions of that input."""
    extra = 0
    while ids.shape[1] + extra in taken:
        extra += 1
    if extra:
        ids = torch.cat([ids, torch.full((ids.shape[0], extra), pad_id, dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], 1)
    return ids, mask


def mask_rows(rows: list[list[int]]) -> torch.Tensor:
    """The attention mask of pad_rows(rows, ...): 1 on each row's tokens, 0 after."""
    return pad_rows([[1] * len(r) for r in rows], 0)


def save_calibration(path: str | Path, input_ids: torch.Tensor, meta: dict[str, str]) -> None:
    save_tensors(path, {"input_ids": input_ids}, metadata=meta)


def load_calibration(path: str | Path, n_samples: int | None = None) -> dict[str, torch.Tensor]:
    """The first `n_samples` calibration samples (stages needing fewer than were built take a
    prefix): {"input_ids"} for text, plus pixel values, masks and labels for image-caption sets;
    pixel values and class labels for image classifiers."""
    data = load_tensors(path)
    ids = data.get("input_ids")
    if "pixel_values" not in data and (ids is None or ids.dim() != 2 or ids.dtype != torch.int64):
        # every family's batch has token ids, except an image classifier's (pixels and labels)
        raise ValueError(f"{path} does not hold an int64 [n, seq_len] 'input_ids' tensor; delete it and rerun calibration")
    count = next(iter(data.values())).shape[0]
    if any(t.shape[0] != count for t in data.values()):
        raise ValueError(f"{path} holds tensors with different sample counts; delete it and rerun calibration")
    if n_samples is not None:
        if n_samples > count:
            raise ValueError(f"{n_samples} calibration samples asked for but {path} holds {count}; "
                             "raise calibration.n_samples in config.yaml")
        data = {k: t[:n_samples] for k, t in data.items()}
    return data


def batches(data: torch.Tensor | dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split samples into batches of keyword arguments (a bare tensor is taken as input_ids)."""
    if isinstance(data, torch.Tensor):
        data = {"input_ids": data}
    n = next(iter(data.values())).shape[0]
    return [{k: t[i:i + batch_size] for k, t in data.items()} for i in range(0, n, batch_size)]
