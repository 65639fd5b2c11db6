"""EVA-CLIP (family eva_clip): the paper's ViT experiment prunes the vision tower of EVA01-CLIP-g/14
and scores zero-shot ImageNet with the dense text tower's classifier. The model is open_clip's
(`EVA01-g-14`: a timm `eva_giant_patch14_224` trunk at `visual.trunk`, 40 blocks of attn.qkv /
attn.proj / mlp.fc1 / mlp.fc2, and a text transformer), loaded by models/open_clip_format.py in
its own environment; this adapter needs neither open_clip nor torchvision.

As the authors' code (ylsung/ECoFLaP at 59dac0a, LAVIS/evaluate_eva_clip.py and
lavis/compression/pruners/): only the vision blocks are pruned; the calibration loss is the
cross-entropy of the images' cosine similarities to the zero-shot classifier (temperature 1,
lavis/compression/pruners/utils.py loss_vision), the classifier being the dense text tower's
mean over CLIP's 80 ImageNet prompts per class; evaluation is top-1 of the same classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecoflap.models.base import Batch, Stack, at_least_fp32
from ecoflap.models.vision_language import VisionLanguageAdapter


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.visual.parameters())
    return p.device, p.dtype


@torch.no_grad()
def zero_shot_classifier(model: nn.Module, tokenizer: Any = None) -> torch.Tensor:
    """[classes, dim]: per class, the normalised mean of its prompts' normalised text embeddings
    (CLIP's recipe, as LAVIS's EVA-CLIP builds it). The text tower is never pruned here, so it is
    computed once per process and kept on the model (not in its state dict)."""
    cached = getattr(model, "_ecoflap_classifier", None)
    if cached is not None:
        return cached
    tokenizer = tokenizer or getattr(model, "ecoflap_tokenizer", None)
    if tokenizer is None:
        raise ValueError("the zero-shot classifier needs the model's tokenizer (load the model with load_model)")
    device, _ = _device_dtype(model)
    rows = []
    for name in model.config.classnames:
        tokens = tokenizer([t.format(name) for t in model.config.templates]).to(device)
        emb = F.normalize(at_least_fp32(model.encode_text(tokens)), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    model._ecoflap_classifier = torch.stack(rows)
    return model._ecoflap_classifier


@dataclass(frozen=True)
class EvaClipAdapter(VisionLanguageAdapter):
    """open_clip's CLIP with a timm EVA trunk: the vision blocks are the one stack pruned."""

    family: str = "eva_clip"

    def stacks(self, model: nn.Module) -> list[Stack]:
        return [Stack("vision", "visual.trunk.blocks", "vision")]

    def labelled_batch(self, model: nn.Module, procs: Any, images: list, labels: list[int]) -> Batch:
        bad = [y for y in labels if not 0 <= y < model.config.num_labels]
        if bad:
            raise ValueError(f"calibration labels {bad[:5]} are outside the {model.config.num_labels} zero-shot classes")
        return {"pixel_values": procs.pixels(images), "labels": torch.tensor(labels, dtype=torch.long)}

    def image_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(at_least_fp32(model.encode_image(pixel_values)), dim=-1)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # cosine similarities as logits (temperature 1), as the authors' loss_vision divides the
        # model's 100x logits by 100
        logits = self.image_features(model, batch["pixel_values"]) @ zero_shot_classifier(model).t()
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    @torch.no_grad()
    def classify(self, model: nn.Module, procs: Any, images: list) -> torch.Tensor:
        device, dtype = _device_dtype(model)
        features = self.image_features(model, procs.pixels(images).to(device, dtype))
        return (100.0 * features @ zero_shot_classifier(model, procs.tokenizer).t()).cpu()


__all__ = ["EvaClipAdapter", "zero_shot_classifier"]
