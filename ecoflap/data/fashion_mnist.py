"""The vendored Fashion-MNIST subset (real product photos, 10 classes): image-caption pairs
for training and calibrating the embedded tiny CLIP, and the zero-shot classification set
its pruned versions are scored on, all offline."""
from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "vision"
CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a product photo of a {}.",
             "a black and white photo of a {}.", "a small photo of a {}.")


def _read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with tools/build_fashion_assets.py")
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int [n]) of "train" (6,000) or "test" (1,000)."""
    return _read_idx(ASSETS / f"fashion_mnist_{split}_images.gz"), _read_idx(ASSETS / f"fashion_mnist_{split}_labels.gz")


def to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode="L").convert("RGB")


def caption(label: int, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(CLASSES[label])


def caption_pairs(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """n seeded (image, caption) pairs from the training subset."""
    images, labels = load_split("train")
    rng = random.Random(seed)
    picks = rng.sample(range(len(labels)), n)
    return [(to_image(images[i]), caption(int(labels[i]), rng)) for i in picks]


def labelled_pairs(n: int, seed: int) -> list[tuple[Image.Image, int]]:
    """n seeded (image, class index) pairs from the training subset (classifier calibration)."""
    images, labels = load_split("train")
    picks = random.Random(seed).sample(range(len(labels)), n)
    return [(to_image(images[i]), int(labels[i])) for i in picks]
