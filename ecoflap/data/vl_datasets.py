"""Vision-language datasets read from their official annotation files.

Nothing here downloads anything: every loader takes the paths of files a user fetched from the
dataset's own site, checks them, and returns plain dataclasses in a deterministic order (the order
of the official file unless a loader says otherwise). A missing file or folder raises
FileNotFoundError naming the file, the dataset, where to get it, and the config key that points to
it. ``config_key`` arguments name the config *section* (e.g. ``evaluation.vqav2``); the message
appends the field (``evaluation.vqav2.questions``, ``evaluation.vqav2.image_dir``, ...).

Formats (as published by each dataset):

* VQAv2 / OK-VQA: ``{"questions": [{"image_id", "question", "question_id"}]}`` and
  ``{"annotations": [{"question_id", "image_id", "answers": [{"answer", ...}], ...}]}``;
  images ``COCO_val2014_{image_id:012d}.jpg``.
* GQA ``testdev_balanced_questions.json``: ``{qid: {"imageId", "question", "answer", ...}}``;
  images ``{imageId}.jpg``.
* Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``):
  ``{"images": [{"filepath"?, "filename", "split", "cocoid"?, "imgid", "sentences": [{"raw"}]}]}``.
* nocaps ``nocaps_val_4500_captions.json`` and COCO ``captions_train2017.json`` (COCO caption
  format): ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
* ImageNet validation in the per-class layout ``val/{wnid}/*.JPEG``.
* Calibration pairs: a TSV/CSV (caption, local image path), a JSON/JSONL list of
  ``{"image", "caption"}``, or webdataset shards (``.tar`` with ``KEY.jpg`` + ``KEY.txt``) such as
  img2dataset writes for CC3M.
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
from typing import Any, Iterable, Sequence, Union

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
    "COCO captions": "https://cocodataset.org/#download (annotations_trainval2017.zip; train2017 images)",
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_WNID = re.compile(r"^n\d{8}$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


# ----------------------------------------------------------------------------- items


@dataclass
class VQAItem:
    question_id: str
    image_path: Path
    question: str
    answers: list[str]


@dataclass
class CaptionItem:
    image_id: str
    image_path: Path
    references: list[str]
    domain: str | None = None  # nocaps: in-domain / near-domain / out-domain


@dataclass
class RetrievalSet:
    image_paths: list[Path]
    texts: list[str]
    img_of_text: list[int]            # text index -> image index
    texts_of_image: list[list[int]]   # image index -> text indices


@dataclass
class ClassificationItem:
    image_path: Path
    label: int


@dataclass
class ImageCaption:
    image_path: Path
    caption: str


class UnreadableImageError(OSError):
    """An image file exists but PIL cannot decode it."""


# ----------------------------------------------------------------------------- checks


def _missing(path: Path, what: str, dataset: str, key: str, *, folder: bool = False) -> FileNotFoundError:
    kind = "folder" if folder else "file"
    return FileNotFoundError(
        f"{dataset}: {what} {kind} not found: {path}. Get it from {SOURCES[dataset]} and set "
        f"`{key}` in the config to its location.")


def _require_file(path: PathLike, what: str, dataset: str, key: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise _missing(p, what, dataset, key)
    return p


def _require_dir(path: PathLike, what: str, dataset: str, key: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise _missing(p, what, dataset, key, folder=True)
    return p


def _check_images(paths: Iterable[Path], dataset: str, key: str) -> None:
    paths = list(paths)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{dataset}: image file not found: {missing[0]} ({len(missing)} of {len(paths)} images "
            f"missing). Get the images from {SOURCES[dataset]} and set `{key}` in the config to the "
            "folder that holds them.")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")


def _take(items: list, limit: int | None) -> list:
    _check_limit(limit)
    return items if limit is None else items[:limit]


def _read_json(path: Path, dataset: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{dataset}: {path} is not valid JSON ({exc})") from exc


def _bad_format(path: Path, dataset: str, expected: str, exc: Exception | None = None) -> ValueError:
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


# ----------------------------------------------------------------------------- VQA


def _load_vqa_format(questions_json: PathLike, annotations_json: PathLike, image_dir: PathLike,
                     limit: int | None, config_key: str, dataset: str, image_pattern: str) -> list[VQAItem]:
    _check_limit(limit)
    qpath = _require_file(questions_json, "questions", dataset, f"{config_key}.questions")
    apath = _require_file(annotations_json, "annotations", dataset, f"{config_key}.annotations")
    idir = _require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    qdata, adata = _read_json(qpath, dataset), _read_json(apath, dataset)
    try:
        questions = list(qdata["questions"])
    except (KeyError, TypeError) as exc:
        raise _bad_format(qpath, dataset, '{"questions": [{"question_id", "image_id", "question"}]}', exc) from exc
    try:
        answers_by_qid = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in adata["annotations"]}
    except (KeyError, TypeError) as exc:
        raise _bad_format(apath, dataset, '{"annotations": [{"question_id", "answers": [{"answer"}]}]}',
                          exc) from exc
    items = []
    for q in questions[: len(questions) if limit is None else limit]:
        try:
            qid, image_id, text = q["question_id"], q["image_id"], q["question"]
        except (KeyError, TypeError) as exc:
            raise _bad_format(qpath, dataset, 'questions with "question_id", "image_id", "question"', exc) from exc
        if qid not in answers_by_qid:
            raise ValueError(f"{dataset}: question {qid} of {qpath} has no entry in {apath}; "
                             "are both files from the same split?")
        items.append(VQAItem(question_id=str(qid), image_path=idir / image_pattern.format(image_id=image_id),
                             question=text, answers=answers_by_qid[qid]))
    _check_images((it.image_path for it in items), dataset, f"{config_key}.image_dir")
    return items


def load_vqav2(questions_json: PathLike, annotations_json: PathLike, image_dir: PathLike,
               limit: int | None = None, *, config_key: str = "evaluation.vqav2",
               image_pattern: str = "COCO_val2014_{image_id:012d}.jpg") -> list[VQAItem]:
    """VQAv2 val: ``v2_OpenEnded_mscoco_val2014_questions.json`` + ``v2_mscoco_val2014_annotations.json``,
    images from COCO ``val2014/``. Items follow the questions file; answers are the 10 raw human answers."""
    return _load_vqa_format(questions_json, annotations_json, image_dir, limit, config_key, "VQAv2", image_pattern)


def load_okvqa(questions_json: PathLike, annotations_json: PathLike, image_dir: PathLike,
               limit: int | None = None, *, config_key: str = "evaluation.okvqa",
               image_pattern: str = "COCO_val2014_{image_id:012d}.jpg") -> list[VQAItem]:
    """OK-VQA val: ``OpenEnded_mscoco_val2014_questions.json`` + ``mscoco_val2014_annotations.json``
    (VQA format), images from COCO ``val2014/``."""
    return _load_vqa_format(questions_json, annotations_json, image_dir, limit, config_key, "OK-VQA", image_pattern)


def load_gqa(questions_json: PathLike, image_dir: PathLike, limit: int | None = None, *,
             config_key: str = "evaluation.gqa") -> list[VQAItem]:
    """GQA ``testdev_balanced_questions.json`` (qid -> {imageId, question, answer, ...}), images
    ``{imageId}.jpg``. Items follow the file's key order; answers = [answer]."""
    dataset = "GQA"
    _check_limit(limit)
    qpath = _require_file(questions_json, "questions", dataset, f"{config_key}.questions")
    idir = _require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    data = _read_json(qpath, dataset)
    if not isinstance(data, dict):
        raise _bad_format(qpath, dataset, "a JSON object mapping question ids to questions")
    items = []
    for qid, q in list(data.items())[: len(data) if limit is None else limit]:
        try:
            items.append(VQAItem(question_id=str(qid), image_path=idir / f"{q['imageId']}.jpg",
                                 question=q["question"], answers=[q["answer"]]))
        except (KeyError, TypeError) as exc:
            raise _bad_format(qpath, dataset, 'questions with "imageId", "question", "answer"', exc) from exc
    _check_images((it.image_path for it in items), dataset, f"{config_key}.image_dir")
    return items


# ----------------------------------------------------------------------------- captions / retrieval


def _karpathy_images(dataset_json: PathLike, split: str, dataset: str, config_key: str) -> tuple[Path, list[dict]]:
    path = _require_file(dataset_json, "Karpathy split", dataset, f"{config_key}.karpathy_json")
    data = _read_json(path, dataset)
    try:
        images = [im for im in data["images"] if im["split"] == split]
    except (KeyError, TypeError) as exc:
        raise _bad_format(path, dataset, '{"images": [{"split", "filename", "sentences"}]}', exc) from exc
    if not images:
        splits = sorted({im.get("split") for im in data["images"]})
        raise ValueError(f"{dataset}: no images with split {split!r} in {path}; it has {splits}")
    return path, images


def _karpathy_image_path(root: Path, im: dict) -> Path:
    return root / im["filepath"] / im["filename"] if im.get("filepath") else root / im["filename"]


def load_coco_karpathy(dataset_json: PathLike, image_root: PathLike, split: str = "test",
                       limit: int | None = None, *, config_key: str = "evaluation.coco_caption") -> list[CaptionItem]:
    """COCO captions, Karpathy split (``dataset_coco.json``). ``image_root`` holds ``val2014/`` and
    ``train2014/`` (each entry's ``filepath``). ``split`` matches the entry's split exactly
    ("test", "val", "train" or "restval"). Items follow the file; references are the raw sentences."""
    dataset = "COCO Karpathy"
    _check_limit(limit)
    root = _require_dir(image_root, "image root", dataset, f"{config_key}.image_root")
    path, images = _karpathy_images(dataset_json, split, dataset, config_key)
    items = []
    for im in _take(images, limit):
        try:
            image_id = im["cocoid"] if "cocoid" in im else im["imgid"]
            items.append(CaptionItem(image_id=str(image_id), image_path=_karpathy_image_path(root, im),
                                     references=[s["raw"].strip() for s in im["sentences"]]))
        except (KeyError, TypeError) as exc:
            raise _bad_format(path, dataset, 'images with "cocoid", "filename", "sentences": [{"raw"}]', exc) from exc
    _check_images((it.image_path for it in items), dataset, f"{config_key}.image_root")
    return items


def _coco_caption_format(path: Path, dataset: str) -> tuple[list[dict], dict[Any, list[str]]]:
    data = _read_json(path, dataset)
    try:
        images = list(data["images"])
        caps: dict[Any, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        if any("id" not in im or "file_name" not in im for im in images):
            raise KeyError("an image entry lacks 'id' or 'file_name'")
    except (KeyError, TypeError) as exc:
        raise _bad_format(path, dataset, '{"images": [{"id", "file_name"}], "annotations": '
                          '[{"image_id", "caption"}]}', exc) from exc
    return images, caps


def load_nocaps(annotations_json: PathLike, image_dir: PathLike, limit: int | None = None, *,
                config_key: str = "evaluation.nocaps") -> list[CaptionItem]:
    """nocaps val (``nocaps_val_4500_captions.json``, COCO caption format). Items follow the
    ``images`` list; ``domain`` is the image's nocaps domain when the file gives one."""
    dataset = "nocaps"
    _check_limit(limit)
    path = _require_file(annotations_json, "annotations", dataset, f"{config_key}.annotations")
    idir = _require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    images, caps = _coco_caption_format(path, dataset)
    items = [CaptionItem(image_id=str(im["id"]), image_path=idir / im["file_name"],
                         references=caps.get(im["id"], []), domain=im.get("domain"))
             for im in _take(images, limit)]
    empty = [it.image_id for it in items if not it.references]
    if empty:
        raise ValueError(f"{dataset}: image {empty[0]} in {path} has no captions; "
                         "use the captions file (nocaps_val_4500_captions.json), not the image-info file")
    _check_images((it.image_path for it in items), dataset, f"{config_key}.image_dir")
    return items


def load_flickr30k_retrieval(dataset_json: PathLike, image_dir: PathLike, split: str = "test",
                             limit: int | None = None, *,
                             config_key: str = "evaluation.flickr30k") -> RetrievalSet:
    """Flickr30k retrieval from Karpathy's ``dataset_flickr30k.json`` (test: 1000 images x 5
    captions). ``limit`` caps the number of images (with all their captions). Images and texts
    follow the file order; ``img_of_text``/``texts_of_image`` give the ground-truth matches."""
    dataset = "Flickr30k"
    _check_limit(limit)
    idir = _require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    path, images = _karpathy_images(dataset_json, split, dataset, config_key)
    out = RetrievalSet(image_paths=[], texts=[], img_of_text=[], texts_of_image=[])
    for i, im in enumerate(_take(images, limit)):
        try:
            out.image_paths.append(_karpathy_image_path(idir, im))
            ids = []
            for s in im["sentences"]:
                ids.append(len(out.texts))
                out.texts.append(s["raw"].strip())
                out.img_of_text.append(i)
        except (KeyError, TypeError) as exc:
            raise _bad_format(path, dataset, 'images with "filename", "sentences": [{"raw"}]', exc) from exc
        out.texts_of_image.append(ids)
    _check_images(out.image_paths, dataset, f"{config_key}.image_dir")
    return out


# ----------------------------------------------------------------------------- ImageNet


def load_imagenet_val(val_dir: PathLike, limit: int | None = None, *, allow_subset: bool = False,
                      config_key: str = "evaluation.imagenet") -> list[ClassificationItem]:
    """ImageNet-1k validation in the per-class layout ``val_dir/{wnid}/*.JPEG``.

    The label is the wnid's position in the sorted 1000 ILSVRC-2012 wnids
    (``imagenet_classes.IMAGENET_WNIDS``, aligned with CLIP's class names), so labels stay right
    when ``allow_subset=True`` admits a folder holding only some classes. Without it, exactly the
    1000 wnid folders must be present. Items are interleaved by class (the first image of every
    class, then the second of every class, ...; classes by wnid, files by name), so a ``limit``
    spreads over classes."""
    from ecoflap.data.imagenet_classes import WNID_TO_INDEX

    dataset = "ImageNet"
    _check_limit(limit)
    root = _require_dir(val_dir, "validation", dataset, f"{config_key}.val_dir")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    dirs = [e.name for e in entries if e.is_dir()]
    wnids = [d for d in dirs if _WNID.match(d)]
    if not wnids:
        flat = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = (" It holds images directly (the flat ILSVRC2012_val_*.JPEG layout): sort them into "
                "one folder per wnid first, using the devkit's validation labels (e.g. the widely used "
                "valprep.sh)." if flat else "")
        raise FileNotFoundError(f"{dataset}: no wnid class folders (n########) in {root}.{hint} "
                                f"Get the images from {SOURCES[dataset]} and set `{config_key}.val_dir`.")
    unknown = [w for w in wnids if w not in WNID_TO_INDEX]
    if unknown:
        raise ValueError(f"{dataset}: {root} has folders that are not ImageNet-1k classes: {unknown[:5]}")
    if not allow_subset and len(wnids) != len(WNID_TO_INDEX):
        absent = [w for w in WNID_TO_INDEX if w not in set(wnids)]
        raise ValueError(f"{dataset}: {root} has {len(wnids)} of the 1000 class folders "
                         f"(missing e.g. {absent[:5]}); pass allow_subset=True to evaluate on a subset")
    per_class: list[list[ClassificationItem]] = []
    for w in wnids:
        files = sorted(e.name for e in os.scandir(root / w)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files and not allow_subset:
            raise ValueError(f"{dataset}: class folder {root / w} holds no images")
        per_class.append([ClassificationItem(image_path=root / w / f, label=WNID_TO_INDEX[w]) for f in files])
    items: list[ClassificationItem] = []
    depth = max((len(c) for c in per_class), default=0)
    for j in range(depth):
        items.extend(c[j] for c in per_class if j < len(c))
        if limit is not None and len(items) >= limit:
            break
    return _take(items, limit)


# ----------------------------------------------------------------------------- calibration pairs


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
        return [_require_file(p, "webdataset shard", dataset, key)]
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


def _delimited_pairs(path: Path, image_root: Path, dataset: str, key: str) -> list[ImageCaption]:
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
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
        records = _read_json(path, dataset)
        if not isinstance(records, list):
            raise _bad_format(path, dataset, 'a list of {"image": path, "caption": str}')
    pairs = []
    for i, rec in enumerate(records):
        try:
            img, cap = rec["image"], rec["caption"]
        except (KeyError, TypeError) as exc:
            raise _bad_format(path, dataset, f'records {{"image", "caption"}} (record {i})', exc) from exc
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
    p = _require_file(p, "image-caption list", dataset, f"{config_key}.path")
    root_key = f"{config_key}.image_root"
    root = _require_dir(image_root, "image", dataset, root_key) if image_root is not None else p.parent
    suffix = p.suffix.lower()
    if suffix in (".json", ".jsonl"):
        pairs = _json_pairs(p, root, dataset)
    elif suffix in (".tsv", ".csv", ".txt"):
        pairs = _delimited_pairs(p, root, dataset, f"{config_key}.path")
    else:
        raise ValueError(f"{dataset}: cannot tell the format of {p}: use .tsv/.csv, .json/.jsonl, or .tar shards")
    chosen = _sample(pairs, n, seed, p, dataset, order)
    _check_images((c.image_path for c in chosen), dataset, root_key)
    return chosen


def load_coco_caption_pairs(captions_json: PathLike, image_dir: PathLike, n: int = 128, seed: int = 0, *,
                            order: str = "random", config_key: str = "calibration.coco") -> list[ImageCaption]:
    """``n`` (image, caption) pairs drawn with ``random.Random(seed).sample`` from the annotations of
    COCO ``captions_train2017.json`` (every caption is a candidate, in file order); images
    ``image_dir/{file_name}``."""
    dataset = "COCO captions"
    path = _require_file(captions_json, "captions", dataset, f"{config_key}.captions")
    idir = _require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    data = _read_json(path, dataset)
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        pairs = [ImageCaption(image_path=idir / files[a["image_id"]], caption=a["caption"].strip())
                 for a in data["annotations"]]
    except (KeyError, TypeError) as exc:
        raise _bad_format(path, dataset, '{"images": [{"id", "file_name"}], "annotations": '
                          '[{"image_id", "caption"}]}', exc) from exc
    chosen = _sample(pairs, n, seed, path, dataset, order)
    _check_images((c.image_path for c in chosen), dataset, f"{config_key}.image_dir")
    return chosen


__all__ = [
    "VQAItem", "CaptionItem", "RetrievalSet", "ClassificationItem", "ImageCaption", "UnreadableImageError",
    "SOURCES", "open_image", "load_vqav2", "load_okvqa", "load_gqa", "load_coco_karpathy", "load_nocaps",
    "load_flickr30k_retrieval", "load_imagenet_val", "load_cc3m_pairs", "load_coco_caption_pairs",
]
