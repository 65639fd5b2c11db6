"""Image-caption calibration: seeded pairs (CC3M, COCO captions or the vendored Fashion-MNIST)
turned into the model family's calibration batch, under the plain captioning protocol or the
authors' ECoFLaP one (prefix/target split, train-time crop and flip); image classifiers get
labelled images instead (ImageNet train, Fashion-MNIST)."""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ecoflap.catalog import CALIBRATION_SOURCES, CAPTION_PROTOCOLS, IMAGE_SOURCES
from ecoflap.data import fashion_mnist
from ecoflap.data.coop import COOP_DATASETS, coop_dataset, load_coop_split
from ecoflap.data.captions import blip_pre_caption
from ecoflap.data.files import open_image
from ecoflap.data.pairs import load_cc3m_pairs, load_coco_caption_pairs, load_imagenet_train
from ecoflap.models.layout import skeleton_of_folder
from ecoflap.models.processors import load_processors
from ecoflap.models.registry import adapter_for

log = logging.getLogger(__name__)


def build_image_caption_calibration(model_dir: str | Path, source: str, n_samples: int, seed: int,
                                    paths: dict[str, str], prompt: str = "", protocol: str = "caption",
                                    max_txt_len: int = 32, coop_dataset: str | None = None) -> dict[str, torch.Tensor]:
    """Seeded image-caption pairs (CC3M as the paper, or COCO captions) turned into the model
    family's calibration batch by its adapter (pixel values, token ids, masks, labels).

    protocol "caption": `n_samples` pairs drawn at random, the whole caption after `prompt` is
    the target, images through the checkpoint's own (evaluation) processor.
    protocol "ecoflap": as the authors' BLIP-2 pruners build it (ylsung/ECoFLaP, LAVIS
    prefix_language_pretraining.py and blip2_t5.py): the first `n_samples` pairs in file order,
    captions through BLIP's pre_caption, each split at a random character (1 .. len // 2) into
    an encoder prefix and a target, both cut to `max_txt_len` tokens, images randomly cropped
    (scale 0.5-1) and flipped as the blip2_image_train processor does.
    source "coop" (a CoOp data set's train split, `coop_dataset`): see `_coop_calibration`."""
    if protocol not in CAPTION_PROTOCOLS:
        raise ValueError(f"unknown calibration protocol {protocol!r} (allowed: {', '.join(CAPTION_PROTOCOLS)})")
    skeleton = skeleton_of_folder(model_dir)  # the adapter only needs the config
    adapter = adapter_for(skeleton)
    if adapter.capabilities.labelled_images:
        return _labelled_calibration(model_dir, skeleton, adapter, source, n_samples, seed, paths, protocol)
    if source in CALIBRATION_SOURCES and not CALIBRATION_SOURCES[source].captioned:
        captioned = [k for k, v in CALIBRATION_SOURCES.items() if v.image and v.captioned]
        raise ValueError(f"calibration source {source} has class labels, not captions; {adapter.family} calibrates "
                         f"on image-caption pairs ({', '.join(captioned)})")
    if source == "coop":
        return _coop_calibration(model_dir, skeleton, adapter, paths, coop_dataset, n_samples, seed, protocol, prompt)
    order = "file" if protocol == "ecoflap" else "random"
    log.info("building %d image-caption calibration pairs from %s (seed %d, protocol %s)", n_samples, source, seed,
             protocol)
    if source == "cc3m":
        pairs = load_cc3m_pairs(_required(paths, "pairs", source), paths.get("image_root"), n=n_samples,
                                seed=seed, cache_dir=paths.get("cache_dir"), order=order)
    elif source == "coco":
        pairs = load_coco_caption_pairs(_required(paths, "captions", source), _required(paths, "image_dir", source),
                                        n=n_samples, seed=seed, order=order)
    elif source == "fashion-mnist":  # vendored: images in memory, no files to open
        images, captions = zip(*fashion_mnist.caption_pairs(n_samples, seed))
        pairs = None
    else:
        raise ValueError(f"unknown image-caption calibration source {source!r} (allowed: {', '.join(IMAGE_SOURCES)})")
    if not adapter.capabilities.image_calibration:
        raise ValueError(f"{adapter.family} is a language model; calibrate it on text (source austen-emma or c4)")
    procs = load_processors(Path(model_dir))
    if pairs is not None:
        images, captions = [open_image(p.image_path) for p in pairs], [p.caption for p in pairs]
    if protocol == "caption":
        return adapter.calibration_batch(skeleton, procs, list(images), list(captions), prompt)
    if not adapter.capabilities.prefix_calibration:
        raise ValueError(f"calibration protocol ecoflap is the authors' BLIP-2 captioning loss; {adapter.family} "
                         "has no such loss (allowed: protocol caption)")
    rng = random.Random(seed)
    size = _processor_size(procs.image_processor)
    images = [_train_crop_flip(im, rng, size) for im in images]
    prefixes, continuations = [], []
    for caption in captions:
        text = blip_pre_caption(caption)
        if len(text) < 2:
            raise ValueError(f"calibration caption {caption!r} is too short to split into a prefix and a target")
        split = rng.randint(1, len(text) // 2)
        prefixes.append(text[:split])
        continuations.append(text[split:])
    return adapter.prefix_calibration_batch(skeleton, procs, list(images), prefixes, continuations, max_txt_len)


def _coop_calibration(model_dir: str | Path, skeleton: Any, adapter: Any, paths: dict[str, str],
                      dataset: str | None, n_samples: int, seed: int, protocol: str, prompt: str
                      ) -> dict[str, torch.Tensor]:
    """CLIP calibrated as the authors' CLIP runs do (ylsung/ECoFLaP CoOp/trainers/zsclip.py):
    `n_samples` images of the data set's own train split, each captioned with the data set's
    zero-shot prompt filled with its class name, under the contrastive loss.

    protocol "coop" also follows their inputs: train-time augmentation (CoOp's vit_b16 config:
    RandomResizedCrop(224, scale 0.08-1, bicubic) and a flip), and captions tokenised as OpenAI's
    clip.tokenize does (padded to the 77-token context with token 0, no padding mask, so the
    padded positions enter the statistics as theirs do). Draws come from random.Random(seed);
    theirs come from Dassl's shuffled loader and cannot be replayed.
    protocol "caption": the same pairs through the checkpoint's evaluation processor, captions
    padded to the longest and padding kept out of the statistics."""
    if not dataset:
        raise ValueError("calibration source coop needs calibration.dataset (one of: "
                         f"{', '.join(COOP_DATASETS)})")
    template = coop_dataset(dataset).template
    split = load_coop_split(_required(paths, "root", "coop"), dataset, "train", "calibration")
    if len(split.labels) < n_samples:
        raise ValueError(f"{dataset}: the train split holds {len(split.labels)} images, fewer than "
                         f"calibration.n_samples = {n_samples}")
    picks = random.Random(seed).sample(range(len(split.labels)), n_samples)
    log.info("calibration: %d %s train images, captions '%s' (seed %d, protocol %s)", n_samples, dataset, template,
             seed, protocol)
    images = [open_image(split.image_paths[i]) for i in picks]
    captions = [split.prompt(split.labels[i], template) for i in picks]
    procs = load_processors(Path(model_dir))
    if protocol == "caption":
        return adapter.calibration_batch(skeleton, procs, images, captions, prompt)
    if protocol != "coop":
        raise ValueError(f"calibration source coop takes protocol coop or caption, not {protocol!r}")
    rng = random.Random(seed + 1)  # crops independent of which images were drawn
    size = _processor_size(procs.image_processor)
    images = [_train_crop_flip(im, rng, size, scale=(0.08, 1.0)) for im in images]
    return adapter.context_padded_batch(skeleton, procs, images, captions)


def _labelled_calibration(model_dir: str | Path, skeleton: Any, adapter: Any, source: str, n_samples: int, seed: int,
                          paths: dict[str, str], protocol: str = "caption") -> dict[str, torch.Tensor]:
    """An image classifier's calibration: `n_samples` labelled images drawn with the seed,
    through the checkpoint's own image processor, with their class indices. protocol ecoflap
    (ImageNet): the first `n_samples` images in folder order instead, as the authors' EVA-CLIP
    pruner reads them (an unshuffled loader)."""
    if source == "fashion-mnist":
        images, labels = zip(*fashion_mnist.labelled_pairs(n_samples, seed))
    elif source == "imagenet":
        picks = load_imagenet_train(_required(paths, "train_dir", source), n_samples, seed,
                                    order="file" if protocol == "ecoflap" else "random")
        images, labels = [open_image(p.image_path) for p in picks], [p.label for p in picks]
    else:
        labelled = [k for k, v in CALIBRATION_SOURCES.items() if v.labelled]
        raise ValueError(f"{adapter.family} calibrates on labelled images ({', '.join(labelled)}), not {source!r}")
    return adapter.labelled_batch(skeleton, load_processors(Path(model_dir)), list(images), list(labels))


def _processor_size(image_processor: Any) -> int:
    size = getattr(image_processor, "size", None) or {}
    return int(size.get("height") or size.get("shortest_edge") or 224)


def _train_crop_flip(image: Any, rng: random.Random, size: int, scale: tuple[float, float] = (0.5, 1.0)) -> Any:
    """torchvision's RandomResizedCrop(size, scale, bicubic) then RandomHorizontalFlip, the
    blip2_image_train processor ECoFLaP calibrates with, drawn from `rng` (so seeded here; the
    authors' draws come from torch's global generator and cannot be replayed)."""
    width, height = image.size
    area = width * height
    ratio = (3 / 4, 4 / 3)
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            box = (left, top, left + w, top + h)
            break
    if box is None:  # torchvision's fallback: a central crop at the nearest allowed aspect ratio
        w, h = width, height
        if width / height < ratio[0]:
            h = int(round(w / ratio[0]))
        elif width / height > ratio[1]:
            w = int(round(h * ratio[1]))
        top, left = (height - h) // 2, (width - w) // 2
        box = (left, top, left + w, top + h)
    out = image.crop(box).resize((size, size), Image.BICUBIC)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def _required(paths: dict[str, str], key: str, source: str) -> str:
    if not paths.get(key):
        raise ValueError(f"calibration source {source} needs calibration.{key} in config.yaml")
    return paths[key]
