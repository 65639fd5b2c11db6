"""The 11 classification data sets of the paper's CLIP table, read as CoOp lays them out
(Zhou et al., "Learning to Prompt for Vision-Language Models"; its DATASETS.md says where to get
each and how to arrange it under one root folder, the ``--root`` of its scripts).

* Nine share one format: a split file ``split_zhou_<Name>.json`` holding
  ``{"train" | "val" | "test": [[relative image path, label, class name], ...]}``, image paths
  relative to the data set's image folder. One reader (``_read_split_file``) serves them all.
* FGVC-Aircraft keeps the official ``variants.txt`` and ``images_variant_<split>.txt`` (lines of
  ``<image id> <variant name>``); the label is the variant's line in ``variants.txt``.
* ImageNet keeps its per-class folders ``images/{train,val}/<wnid>/`` (CoOp tests on val);
  labels follow the sorted wnids and the names come from CoOp's ``classnames.txt`` (CLIP's).

Each data set carries the single zero-shot prompt of CoOp's ``trainers/zsclip.py``
(CUSTOM_TEMPLATES), which the ECoFLaP authors' CLIP runs use for both the calibration captions
and the class embeddings; class names have ``_`` turned into spaces there, as here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ecoflap.data.files import COOP_GUIDE, IMAGE_EXTENSIONS, PathLike, bad_format, read_json, require_dir, require_file

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CoopDataset:
    folder: str            # under the root
    image_dir: str         # under the folder; "" = the folder itself
    template: str          # CoOp's zero-shot prompt
    split_file: str = ""   # split_zhou_*.json; "" for the two with their own layout
    name: str = ""         # CoOp's DATASET.NAME (for messages and the report)


COOP_DATASETS: dict[str, CoopDataset] = {
    "caltech101": CoopDataset("caltech-101", "101_ObjectCategories", "a photo of a {}.",
                              "split_zhou_Caltech101.json", "Caltech101"),
    "dtd": CoopDataset("dtd", "images", "{} texture.", "split_zhou_DescribableTextures.json",
                       "DescribableTextures"),
    "eurosat": CoopDataset("eurosat", "2750", "a centered satellite photo of {}.", "split_zhou_EuroSAT.json",
                           "EuroSAT"),
    "fgvc_aircraft": CoopDataset("fgvc_aircraft", "images", "a photo of a {}, a type of aircraft.",
                                 name="FGVCAircraft"),
    "food101": CoopDataset("food-101", "images", "a photo of {}, a type of food.", "split_zhou_Food101.json",
                           "Food101"),
    "imagenet": CoopDataset("imagenet", "images", "a photo of a {}.", name="ImageNet"),
    "oxford_flowers": CoopDataset("oxford_flowers", "jpg", "a photo of a {}, a type of flower.",
                                  "split_zhou_OxfordFlowers.json", "OxfordFlowers"),
    "oxford_pets": CoopDataset("oxford_pets", "images", "a photo of a {}, a type of pet.",
                               "split_zhou_OxfordPets.json", "OxfordPets"),
    "stanford_cars": CoopDataset("stanford_cars", "", "a photo of a {}.", "split_zhou_StanfordCars.json",
                                 "StanfordCars"),
    "sun397": CoopDataset("sun397", "SUN397", "a photo of a {}.", "split_zhou_SUN397.json", "SUN397"),
    "ucf101": CoopDataset("ucf101", "UCF-101-midframes", "a photo of a person doing {}.",
                          "split_zhou_UCF101.json", "UCF101"),
}


@dataclass(frozen=True)
class CoopSplit:
    image_paths: list[Path]
    labels: list[int]
    classnames: tuple[str, ...]  # label -> name as the prompt shows it ("_" -> " ")

    def prompt(self, label: int, template: str) -> str:
        return template.format(self.classnames[label])


def coop_dataset(name: str) -> CoopDataset:
    if name not in COOP_DATASETS:
        raise ValueError(f"unknown CoOp data set {name!r} (allowed: {', '.join(COOP_DATASETS)})")
    return COOP_DATASETS[name]


def load_coop_split(root: PathLike, name: str, split: str, config_key: str) -> CoopSplit:
    """One split of a CoOp data set under `root` (CoOp's --root): image paths, labels and the
    class names indexed by label. `config_key` is the config entry that sets `root`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    d = coop_dataset(name)
    base = Path(root) / d.folder
    if not base.is_dir():
        raise FileNotFoundError(f"{d.name}: folder {base} not found. Download it as {COOP_GUIDE} describes "
                                f"(section {d.name}) and set `{config_key}.root` to the folder that holds "
                                f"{d.folder}/.")
    images = base / d.image_dir if d.image_dir else base
    if d.split_file:
        split_path = require_file(base / d.split_file, "split", d.name, f"{config_key}.root")
        paths, labels, names = _read_split_file(split_path, images, split, d.name)
    elif name == "fgvc_aircraft":
        paths, labels, names = _read_fgvc(base, images, split, f"{config_key}.root")
    else:
        paths, labels, names = _read_imagenet(base, images, split, f"{config_key}.root")
    if not paths:
        raise ValueError(f"{d.name}: the {split} split is empty")
    missing = next((p for p in paths if not os.path.isfile(p)), None)
    if missing is not None:
        raise FileNotFoundError(f"{d.name}: image not found: {missing} (the {split} split lists {len(paths)}). "
                                f"Unpack the images as {COOP_GUIDE} describes (section {d.name}) and set "
                                f"`{config_key}.root`.")
    return CoopSplit(paths, labels, tuple(n.replace("_", " ") for n in names))


def _class_table(pairs: dict[int, str], source: Path, dataset: str) -> list[str]:
    """Class names by label 0..K-1 (every label must be named)."""
    if sorted(pairs) != list(range(len(pairs))):
        raise bad_format(source, dataset, "labels 0..K-1 with one class name each")
    return [pairs[i] for i in range(len(pairs))]


def _read_split_file(path: Path, images: Path, split: str, dataset: str) -> tuple[list[Path], list[int], list[str]]:
    data = read_json(path, dataset)
    expected = '{"train"|"val"|"test": [[image path, label, class name], ...]}'
    if not isinstance(data, dict) or split not in data:
        raise bad_format(path, dataset, expected)
    names: dict[int, str] = {}
    for part in SPLITS:  # the names of every split: a test split may lack a class the train split has
        for entry in data.get(part, []):
            try:
                _, label, classname = entry
            except (TypeError, ValueError) as exc:
                raise bad_format(path, dataset, expected, exc) from exc
            names.setdefault(int(label), str(classname))
    rows = data[split]
    return [images / r[0] for r in rows], [int(r[1]) for r in rows], _class_table(names, path, dataset)


def _read_fgvc(base: Path, images: Path, split: str, key: str) -> tuple[list[Path], list[int], list[str]]:
    dataset = "FGVCAircraft"
    variants = require_file(base / "variants.txt", "variants", dataset, key)
    names = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    index = {n: i for i, n in enumerate(names)}
    listing = require_file(base / f"images_variant_{split}.txt", split, dataset, key)
    paths, labels = [], []
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in index:
            raise bad_format(listing, dataset, f"'<image id> <variant>' lines with variants from {variants}")
        paths.append(images / f"{image_id}.jpg")
        labels.append(index[variant])
    return paths, labels, names


def _read_imagenet(base: Path, images: Path, split: str, key: str) -> tuple[list[Path], list[int], list[str]]:
    dataset = "ImageNet"
    folder = {"train": "train", "val": "val", "test": "val"}[split]  # CoOp tests on the validation set
    split_dir = require_dir(images / folder, folder, dataset, key)
    listing = base / "classnames.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{dataset}: {listing} not found: CoOp's class names (CLIP's), linked from "
                                f"{COOP_GUIDE} (section ImageNet); set `{key}`.")
    wnid_names = {}
    for line in listing.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            wnid_names[wnid] = name
    wnids = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    unknown = [w for w in wnids if w not in wnid_names]
    if unknown:
        raise bad_format(listing, dataset, f"a line '<wnid> <class name>' for every folder of {split_dir} "
                         f"(missing {unknown[:3]})")
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        for f in sorted(e.name for e in os.scandir(split_dir / wnid) if e.name.lower().endswith(IMAGE_EXTENSIONS)):
            paths.append(split_dir / wnid / f)
            labels.append(label)
    return paths, labels, [wnid_names[w] for w in wnids]


__all__ = ["COOP_DATASETS", "CoopDataset", "CoopSplit", "coop_dataset", "load_coop_split"]
