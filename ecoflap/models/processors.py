"""What turns images and text into model inputs: a tokenizer for language models;
tokenizer + image processor (+ InstructBLIP's Q-Former tokenizer) for vision-language
models. Saved beside every checkpoint and loaded back with it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from ecoflap.models.open_clip_format import is_open_clip_folder, load_open_clip_processors


@dataclass
class Processors:
    """What turns images and text into model inputs (saved beside the checkpoint)."""

    tokenizer: Any
    image_processor: Any = None
    qformer_tokenizer: Any = None  # InstructBLIP tokenises the instruction twice

    def pixels(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt").pixel_values

    def save_pretrained(self, out: Any) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(Path(out) / "qformer_tokenizer")



TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt", "spiece.model")


def load_processors(path: Path, trust_remote_code: bool = False) -> Any:
    """A text tokenizer for LMs; `Processors` for vision-language checkpoints (those with a
    preprocessor_config.json). PIL image processors only: the fast ones need torchvision,
    which the core environment does not have."""
    path = Path(path)
    if is_open_clip_folder(path):
        return load_open_clip_processors(path)
    if not (path / "preprocessor_config.json").exists():
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # an image classifier (ViT, DeiT) ships an image processor and no tokenizer
    has_tokenizer = any((path / f).exists() for f in TOKENIZER_FILES)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code) if has_tokenizer else None
    image = AutoImageProcessor.from_pretrained(path, backend="pil")
    qtok = AutoTokenizer.from_pretrained(path / "qformer_tokenizer") if (path / "qformer_tokenizer").is_dir() else None
    return Processors(tok, image, qtok)
