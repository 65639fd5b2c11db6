"""Image classifiers (family image_classifier): ViT and DeiT fine-tuned on ImageNet-1k
(`ViTForImageClassification`, `DeiTForImageClassification[WithTeacher]`): patch embedding ->
one stack of encoder blocks -> final norm -> classification head.

Calibration is labelled images (ImageNet train, or the vendored Fashion-MNIST), the loss the
cross-entropy of the head's logits; evaluation is top-1 / top-5 with the same logits."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ecoflap.models.base import Batch, Stack, at_least_fp32
from ecoflap.models.processors import Processors
from ecoflap.models.vision_language import VisionLanguageAdapter


@dataclass(frozen=True)
class ImageClassifierAdapter(VisionLanguageAdapter):
    """`base` is the backbone's attribute (vit, deit); its blocks are the one stack."""

    base: str = "vit"
    family: str = "image_classifier"

    def stacks(self, model: nn.Module) -> list[Stack]:
        backbone = getattr(model, self.base)
        # transformers 5 keeps the blocks at vit.layers; 4.x at vit.encoder.layer
        path = f"{self.base}.layers" if hasattr(backbone, "layers") else f"{self.base}.encoder.layer"
        return [Stack("vision", path, "vision")]

    def labelled_batch(self, model: nn.Module, procs: Processors, images: list, labels: list[int]) -> Batch:
        n_classes = model.config.num_labels
        bad = [y for y in labels if not 0 <= y < n_classes]
        if bad:
            raise ValueError(f"calibration labels {bad[:5]} are outside this classifier's {n_classes} classes; "
                             "calibrate it on the data set its head was trained for")
        return {"pixel_values": procs.pixels(images), "labels": torch.tensor(labels, dtype=torch.long)}

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        # the model's own logits (DeiT with a teacher: the mean of its two heads, as it classifies)
        return at_least_fp32(model(pixel_values=pixel_values).logits)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # computed here, not by the model: DeiT's distilled class takes no labels
        return F.cross_entropy(self.logits(model, batch["pixel_values"]), batch["labels"])

    @torch.no_grad()
    def classify(self, model: nn.Module, procs: Processors, images: list) -> torch.Tensor:
        """[images, classes] logits, through the checkpoint's own image processor."""
        return self.logits(model, procs.pixels(images).to(model.device, model.dtype)).cpu()
