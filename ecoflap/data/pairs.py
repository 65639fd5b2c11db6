"""Image-caption pairs for calibration: CC3M (a local TSV/CSV or JSON/JSONL list, or webdataset
shards) and COCO captions, sampled with a fixed seed or taken in file order; and labelled
ImageNet training images for image classifiers.

Formats: a TSV/CSV (caption, local image path), a JSON/JSONL list of ``{"image", "caption"}``, or
webdataset shards (``.tar`` with ``KEY.jpg`` + ``KEY.txt``) such as img2dataset writes for CC3M;
COCO ``captions_train2017.json`` (COCO caption format:
``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ecoflap.data.files import (IMAGE_EXTENSIONS, SOURCES, PathLike, bad_format, check_images, read_json,
                                require_dir, require_file)
from ecoflap.data.imagenet_classes import WNID_TO_INDEX

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class ImageCaption:
    image_path: Path
    caption: str


PAIR_ORDERS = ("random", "file")


def _sample(pairs: Sequence, n: int, seed: int, source: Path, dataset: str, order: str = "random") -> list:
    """`n` pairs: drawn with random.Random(seed).sample ("random"), or the first n in the file's
    order ("file"), as ECoFLaP's pruners read CC3M (an unshuffled loader over cc3m.json)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if n > len(pairs):
        raise ValueError(f"{dataset}: asked for {n} calibration pairs but {source} holds {len(pairs)}")
    if order not in PAIR_ORDERS:
        raise ValueError(f"pair order must be one of {PAIR_ORDERS}, got {order!r}")
    return list(pairs)[:n] if order == "file" else random.Random(seed).sample(list(pairs), n)


def _expand_braces(pattern: str) -> list[str]:
    """webdataset-style numeric ranges: ``cc3m-{00000..00003}.tar``."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    out = []
    for i in range(lo, hi + 1):
        out.extend(_expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def _find_shards(path: str, dataset: str, key: str) -> list[Path]:
    """A folder of .tar files, one .tar file, a glob, or a {lo..hi} range (or a glob with ranges)."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
    elif any(c in path for c in "*?[{"):
        shards = []
        for pat in _expand_braces(path):
            shards.extend(Path(f) for f in sorted(glob.glob(pat)))
    else:
        return [require_file(p, "webdataset shard", dataset, key)]
    if not shards:
        raise FileNotFoundError(f"{dataset}: no webdataset .tar shards found at {path}. Get the data from "
                                f"{SOURCES[dataset]} and set `{key}` in the config to the shards.")
    return shards


def _split_member(name: str) -> tuple[str, str]:
    """webdataset key/extension: the key is the path up to the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _webdataset_pairs(shards: list[Path], n: int, seed: int, cache_dir: PathLike | None,
                      dataset: str, key: str, order: str = "random") -> list[ImageCaption]:
    if cache_dir is None:
        raise ValueError(f"{dataset}: reading webdataset shards needs cache_dir (where the sampled "
                         f"images are extracted; `{key}` in the config)")
    candidates = []  # (shard index, key, image member name, text member name)
    for si, shard in enumerate(shards):
        try:
            with tarfile.open(shard, "r:*") as tar:
                groups: dict[str, dict[str, str]] = {}
                for m in tar.getmembers():
                    if m.isfile():
                        k, ext = _split_member(m.name)
                        groups.setdefault(k, {})[ext] = m.name
        except tarfile.TarError as exc:
            raise ValueError(f"{dataset}: cannot read webdataset shard {shard}: {exc}") from exc
        for k, exts in groups.items():
            img = next((exts[e] for e in ("jpg", "jpeg", "png", "webp") if e in exts), None)
            if img is not None and "txt" in exts:
                candidates.append((si, k, img, exts["txt"]))
    label = shards[0] if len(shards) == 1 else Path(f"{len(shards)} shards under {shards[0].parent}")
    chosen = _sample(candidates, n, seed, label, dataset, order)
    cache = Path(cache_dir)
    by_shard: dict[int, list[int]] = {}
    for pos, c in enumerate(chosen):
        by_shard.setdefault(c[0], []).append(pos)
    out: list[ImageCaption | None] = [None] * len(chosen)
    for si, positions in sorted(by_shard.items()):
        shard = shards[si]
        dest_dir = cache / shard.name.removesuffix(".tar")
        dest_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(shard, "r:*") as tar:
            for pos in positions:
                _, k, img_name, txt_name = chosen[pos]
                caption = tar.extractfile(txt_name).read().decode("utf-8").strip()
                ext = img_name.rpartition(".")[2].lower()
                dest = dest_dir / f"{k.replace('/', '__')}.{ext}"
                member = tar.getmember(img_name)
                if not (dest.is_file() and dest.stat().st_size == member.size):
                    tmp = dest.with_name(dest.name + ".part")
                    tmp.write_bytes(tar.extractfile(member).read())
                    tmp.replace(dest)
                out[pos] = ImageCaption(image_path=dest, caption=caption)
    return [o for o in out if o is not None]


_IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "file", "filename", "file_name", "path", "url")


def _dialect(path: Path) -> dict:
    """A .csv is standard CSV (quoted fields may hold commas). A .tsv/.txt is CC3M's format, one
    pair per line with no quoting: its captions hold bare double quotes ('"best of" 2010'), which
    csv's default quotechar would take as a field that runs across tabs and lines, merging rows."""
    if path.suffix.lower() == ".csv":
        return {"delimiter": ","}
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}


def _delimited_pairs(path: Path, image_root: Path, dataset: str, key: str) -> list[ImageCaption]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, **_dialect(path)) if r]
    if not rows:
        raise ValueError(f"{dataset}: {path} is empty")
    header = [c.strip().lower() for c in rows[0]]
    first_line = 1
    if "caption" in header:
        cap_col = header.index("caption")
        img_col = next((header.index(c) for c in _IMAGE_COLUMNS if c in header), None)
        if img_col is None:
            raise ValueError(f"{dataset}: {path} has a caption column but no image column "
                             f"(one of {', '.join(_IMAGE_COLUMNS)})")
        col_name, rows, first_line = repr(rows[0][img_col]), rows[1:], 2
    else:  # no header: the CC3M order, caption<TAB>image
        cap_col, img_col, col_name = 0, 1, "2nd"
    pairs = []
    for lineno, r in enumerate(rows, start=first_line):
        if len(r) <= max(cap_col, img_col):
            raise ValueError(f"{dataset}: line {lineno} of {path} has {len(r)} column(s); expected a caption "
                             "and an image path")
        img = r[img_col].strip()
        if _URL.match(img):
            raise ValueError(
                f"{dataset}: the image column ({col_name}) of {path} holds URLs (line {lineno}: {img[:80]}), "
                "not local files. Download the images first with img2dataset "
                "(https://github.com/rom1504/img2dataset), e.g. `img2dataset --url_list <tsv> "
                "--input_format tsv --url_col url --caption_col caption --output_format webdataset "
                "--output_folder cc3m` (CC3M's Train_GCC-training.tsv has no header: add the line "
                f"'caption<TAB>url' first), then set `{key}` to the resulting .tar shards.")
        pairs.append(ImageCaption(image_path=image_root / img, caption=r[cap_col].strip()))
    return pairs


def _json_pairs(path: Path, image_root: Path, dataset: str) -> list[ImageCaption]:
    if path.suffix.lower() == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{dataset}: line {lineno} of {path} is not JSON ({exc})") from exc
    else:
        records = read_json(path, dataset)
        if not isinstance(records, list):
            raise bad_format(path, dataset, 'a list of {"image": path, "caption": str}')
    pairs = []
    for i, rec in enumerate(records):
        try:
            img, cap = rec["image"], rec["caption"]
        except (KeyError, TypeError) as exc:
            raise bad_format(path, dataset, f'records {{"image", "caption"}} (record {i})', exc) from exc
        if _URL.match(str(img)):
            raise ValueError(f"{dataset}: record {i} of {path} has a URL image ({str(img)[:80]}); download the "
                             "images first with img2dataset (https://github.com/rom1504/img2dataset)")
        pairs.append(ImageCaption(image_path=image_root / img, caption=str(cap).strip()))
    return pairs


def load_cc3m_pairs(path: PathLike, image_root: PathLike | None = None, n: int = 128, seed: int = 0, *,
                    cache_dir: PathLike | None = None, order: str = "random",
                    config_key: str = "calibration.cc3m") -> list[ImageCaption]:
    """``n`` image-caption pairs drawn with ``random.Random(seed).sample`` (or the first ``n`` in file
    order with ``order="file"``) from one of:

    * a ``.tsv``/``.csv`` with a header naming ``caption`` and an image column (``image``,
      ``image_path``, ``filepath``, ...), or no header and the CC3M column order caption, image;
      the image column must hold local paths (URLs raise an error pointing to img2dataset);
    * a ``.jsonl`` or ``.json`` list of ``{"image": path, "caption": str}``;
    * webdataset shards (a folder of ``.tar`` files, a ``.tar`` file, a glob, or a
      ``{00000..00009}`` range) with ``KEY.jpg`` + ``KEY.txt`` members; the sampled images are
      extracted into ``cache_dir/<shard>/``.

    Relative image paths are resolved against ``image_root`` (default: the file's folder).
    ``config_key`` is the config section: messages name ``<config_key>.path``,
    ``<config_key>.image_root`` and ``<config_key>.cache_dir``."""
    dataset = "CC3M"
    spath = os.fspath(path)
    p = Path(spath)
    if p.is_dir() or p.suffix.lower() == ".tar" or any(c in spath for c in "*?[{"):
        shards = _find_shards(spath, dataset, f"{config_key}.path")
        return _webdataset_pairs(shards, n, seed, cache_dir, dataset, f"{config_key}.cache_dir", order)
    p = require_file(p, "image-caption list", dataset, f"{config_key}.path")
    root_key = f"{config_key}.image_root"
    root = require_dir(image_root, "image", dataset, root_key) if image_root is not None else p.parent
    suffix = p.suffix.lower()
    if suffix in (".json", ".jsonl"):
        pairs = _json_pairs(p, root, dataset)
    elif suffix in (".tsv", ".csv", ".txt"):
        pairs = _delimited_pairs(p, root, dataset, f"{config_key}.path")
    else:
        raise ValueError(f"{dataset}: cannot tell the format of {p}: use .tsv/.csv, .json/.jsonl, or .tar shards")
    chosen = _sample(pairs, n, seed, p, dataset, order)
    check_images((c.image_path for c in chosen), dataset, root_key)
    return chosen


def load_coco_caption_pairs(captions_json: PathLike, image_dir: PathLike, n: int = 128, seed: int = 0, *,
                            order: str = "random", config_key: str = "calibration.coco") -> list[ImageCaption]:
    """``n`` (image, caption) pairs drawn with ``random.Random(seed).sample`` from the annotations of
    COCO ``captions_train2017.json`` (every caption is a candidate, in file order); images
    ``image_dir/{file_name}``."""
    dataset = "COCO captions"
    path = require_file(captions_json, "captions", dataset, f"{config_key}.captions")
    idir = require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    data = read_json(path, dataset)
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        pairs = [ImageCaption(image_path=idir / files[a["image_id"]], caption=a["caption"].strip())
                 for a in data["annotations"]]
    except (KeyError, TypeError) as exc:
        raise bad_format(path, dataset, '{"images": [{"id", "file_name"}], "annotations": '
                         '[{"image_id", "caption"}]}', exc) from exc
    chosen = _sample(pairs, n, seed, path, dataset, order)
    check_images((c.image_path for c in chosen), dataset, f"{config_key}.image_dir")
    return chosen


__all__ = ["ImageCaption", "PAIR_ORDERS", "load_cc3m_pairs", "load_coco_caption_pairs"]


@dataclass
class LabelledImage:
    image_path: Path
    label: int


def load_imagenet_train(train_dir: PathLike, n: int = 128, seed: int = 0, order: str = "random"
                        ) -> list[LabelledImage]:
    """`n` images drawn with random.Random(seed) from ImageNet-1k's training set in its per-class
    layout ``train_dir/{wnid}/*.JPEG``; the label is the wnid's position among the sorted 1000
    wnids, the index ImageNet-1k classifiers (ViT, DeiT) predict. order "file": the first `n`
    in folder order (classes by wnid, files by name), as an unshuffled torchvision ImageFolder
    loader gives them (the authors' EVA-CLIP calibration)."""
    if order not in PAIR_ORDERS:
        raise ValueError(f"order must be one of {PAIR_ORDERS}, got {order!r}")
    dataset, key = "ImageNet", "calibration.train_dir"
    root = require_dir(train_dir, "training", dataset, key)
    wnids = sorted(e.name for e in os.scandir(root) if e.is_dir() and re.match(r"^n\d{8}$", e.name))
    if not wnids:
        raise FileNotFoundError(f"{dataset}: no wnid class folders (n########) in {root}. Get ILSVRC2012's training "
                                f"images from https://image-net.org/download.php (one folder per wnid, as the "
                                f"archive unpacks) and set `{key}`.")
    unknown = [w for w in wnids if w not in WNID_TO_INDEX]
    if unknown:
        raise ValueError(f"{dataset}: {root} has folders that are not ImageNet-1k classes: {unknown[:5]}")
    items = [LabelledImage(root / w / f, WNID_TO_INDEX[w]) for w in wnids
             for f in sorted(e.name for e in os.scandir(root / w) if e.name.lower().endswith(IMAGE_EXTENSIONS))]
    if len(items) < n:
        raise ValueError(f"{dataset}: {root} holds {len(items)} images, fewer than calibration.n_samples = {n}")
    picks = items[:n] if order == "file" else random.Random(seed).sample(items, n)
    check_images([p.image_path for p in picks], dataset, key)
    return picks
