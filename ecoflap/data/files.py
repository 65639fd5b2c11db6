"""Shared file readers for the dataset loaders: images opened as RGB with clear errors, and checks
that name a missing or malformed file with its dataset, where to get it (``SOURCES``) and the
config key that points to it. Nothing here downloads anything."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

from PIL import Image, UnidentifiedImageError

PathLike = Union[str, "os.PathLike[str]"]

# Where each dataset comes from (named in every missing-file message).
SOURCES: dict[str, str] = {
    "VQAv2": "https://visualqa.org/download.html (questions + annotations; "
             "images: COCO val2014 from https://cocodataset.org/#download)",
    "OK-VQA": "https://okvqa.allenai.org/ (questions + annotations; "
              "images: COCO val2014 from https://cocodataset.org/#download)",
    "GQA": "https://cs.stanford.edu/people/dorarad/gqa/download.html (questions1.2 + images)",
    "COCO Karpathy": "https://cs.stanford.edu/people/karpathy/deepimagesent/ (caption_datasets.zip; "
                     "images: COCO train2014/val2014 from https://cocodataset.org/#download)",
    "Flickr30k": "https://cs.stanford.edu/people/karpathy/deepimagesent/ (caption_datasets.zip; "
                 "images: flickr30k-images from https://shannon.cs.illinois.edu/DenotationGraph/)",
    "nocaps": "https://nocaps.org/download (nocaps_val_4500_captions.json; "
              "images: Open Images V4 validation)",
    "ImageNet": "https://image-net.org/download.php (ILSVRC2012 validation images, "
                "sorted into val/{wnid}/ folders)",
    "CC3M": "https://ai.google.com/research/ConceptualCaptions/download (Train_GCC-training.tsv), "
            "images fetched with img2dataset (https://github.com/rom1504/img2dataset)",
    "TextVQA": "https://textvqa.org/dataset (TextVQA_0.5.1_val.json and TextVQA_Rosetta_OCR_v0.2_val.json; "
               "images: train_val_images.zip, whose train_images/ folder holds the val images)",
    "COCO captions": "https://cocodataset.org/#download (annotations_trainval2017.zip; train2017 images)",
}

# The CLIP table's data sets, as CoOp arranges them (split files and folders under one root).
COOP_GUIDE = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
SOURCES.update({name: f"{COOP_GUIDE} (section {name})" for name in (
    "Caltech101", "DescribableTextures", "EuroSAT", "FGVCAircraft", "Food101", "OxfordFlowers", "OxfordPets",
    "StanfordCars", "SUN397", "UCF101")})

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class UnreadableImageError(OSError):
    """An image file exists but PIL cannot decode it."""


def _missing(path: Path, what: str, dataset: str, key: str, *, folder: bool = False) -> FileNotFoundError:
    kind = "folder" if folder else "file"
    return FileNotFoundError(
        f"{dataset}: {what} {kind} not found: {path}. Get it from {SOURCES[dataset]} and set "
        f"`{key}` in the config to its location.")


def require_file(path: PathLike, what: str, dataset: str, key: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise _missing(p, what, dataset, key)
    return p


def require_dir(path: PathLike, what: str, dataset: str, key: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise _missing(p, what, dataset, key, folder=True)
    return p


def check_images(paths: Iterable[Path], dataset: str, key: str) -> None:
    paths = list(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{dataset}: image file not found: {missing[0]} ({len(missing)} of {len(paths)} images "
            f"missing). Get the images from {SOURCES[dataset]} and set `{key}` in the config to the "
            "folder that holds them.")


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")


def take(items: list, limit: int | None) -> list:
    check_limit(limit)
    return items if limit is None else items[:limit]


def read_json(path: Path, dataset: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{dataset}: {path} is not valid JSON ({exc})") from exc


def bad_format(path: Path, dataset: str, expected: str, exc: Exception | None = None) -> ValueError:
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return ValueError(f"{dataset}: {path} is not in the official format: expected {expected}{detail}")


def open_image(path: PathLike) -> Image.Image:
    """Read an image fully into memory as RGB; clear errors for missing or undecodable files."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImageError(f"cannot read image {p}: {exc} (corrupt, truncated or not an image)") from exc


__all__ = [
    "PathLike", "SOURCES", "COOP_GUIDE", "IMAGE_EXTENSIONS", "UnreadableImageError", "open_image", "require_file",
    "require_dir", "check_images", "check_limit", "take", "read_json", "bad_format",
]
