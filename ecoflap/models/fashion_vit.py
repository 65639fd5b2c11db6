"""The embedded image classifier: a small ViT (ViTForImageClassification) trained here, from
scratch and seeded, on the vendored Fashion-MNIST subset (6,000 real product photos, 10
classes). No pretrained classifier can be had offline, so this is what lets the image-classifier
family produce real accuracy numbers on a CPU machine: top-1 on the 1,000 held-out test photos."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from ecoflap.data import fashion_mnist as fm
from ecoflap.models.embedded_training import train_epochs

log = logging.getLogger(__name__)


def build_model() -> ViTForImageClassification:
    config = ViTConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4,
                       image_size=28, patch_size=4, num_channels=3, num_labels=len(fm.CLASSES),
                       id2label=dict(enumerate(fm.CLASSES)), label2id={c: i for i, c in enumerate(fm.CLASSES)})
    return ViTForImageClassification(config)


def image_processor() -> ViTImageProcessor:
    # 28x28 grey photos, normalised with the training set's statistics (as the fashion CLIP)
    return ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.286] * 3, image_std=[0.353] * 3)


def train_fashion_vit(out_dir: Path, seed: int = 0, epochs: int = 8, batch_size: int = 128,
                      lr: float = 2e-3) -> dict[str, Any]:
    """Cross-entropy training with random horizontal flips; returns its record."""
    torch.manual_seed(seed)
    pix = image_processor()
    model = build_model().train()
    images, labels = fm.load_split("train")
    pixels = pix(images=[fm.to_image(a) for a in images], return_tensors="pt").pixel_values
    labels_t = torch.as_tensor(labels.astype("int64"))

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = pixels[idx]
        flip = torch.rand(len(idx)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return F.cross_entropy(model(pixel_values=x).logits, labels_t[idx])

    final = train_epochs(model, len(labels), epochs, batch_size, lr, "training the embedded fashion ViT", loss_of)
    model.eval()
    model.save_pretrained(out_dir)
    pix.save_pretrained(out_dir)
    return {"source": "embedded", "name": "fashion-vit", "trained": {"seed": seed, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "train_images": len(labels), "final_loss": round(final, 4)},
            "note": "ViT classifier trained from scratch on the vendored Fashion-MNIST subset (MIT)"}
