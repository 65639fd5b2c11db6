"""Evaluation-set loaders (VQAv2, OK-VQA, GQA, COCO Karpathy, nocaps, Flickr30k, ImageNet) read
from their official annotation files into plain dataclasses, in a deterministic order (the order
of the official file unless a loader says otherwise).

``config_key`` arguments name the config *section* (e.g. ``evaluation.vqav2``); a missing-file
message appends the field (``evaluation.vqav2.questions``, ``evaluation.vqav2.image_dir``, ...).

Formats (as published by each dataset):

* VQAv2 / OK-VQA: ``{"questions": [{"image_id", "question", "question_id"}]}`` and
  ``{"annotations": [{"question_id", "image_id", "answers": [{"answer", ...}], ...}]}``;
  images ``COCO_val2014_{image_id:012d}.jpg``.
* GQA ``testdev_balanced_questions.json``: ``{qid: {"imageId", "question", "answer", ...}}``;
  images ``{imageId}.jpg``.
* Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``):
  ``{"images": [{"filepath"?, "filename", "split", "cocoid"?, "imgid", "sentences": [{"raw"}]}]}``.
* nocaps ``nocaps_val_4500_captions.json`` (COCO caption format):
  ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
* ImageNet validation in the per-class layout ``val/{wnid}/*.JPEG``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoflap.data.files import (IMAGE_EXTENSIONS, SOURCES, PathLike, bad_format, check_images, check_limit,
                                read_json, require_dir, require_file, take)
from ecoflap.data.imagenet_classes import WNID_TO_INDEX

_WNID = re.compile(r"^n\d{8}$")


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


# ----------------------------------------------------------------------------- VQA


def _load_vqa_format(questions_json: PathLike, annotations_json: PathLike, image_dir: PathLike,
                     limit: int | None, config_key: str, dataset: str, image_pattern: str) -> list[VQAItem]:
    check_limit(limit)
    qpath = require_file(questions_json, "questions", dataset, f"{config_key}.questions")
    apath = require_file(annotations_json, "annotations", dataset, f"{config_key}.annotations")
    idir = require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    qdata, adata = read_json(qpath, dataset), read_json(apath, dataset)
    try:
        questions = list(qdata["questions"])
    except (KeyError, TypeError) as exc:
        raise bad_format(qpath, dataset, '{"questions": [{"question_id", "image_id", "question"}]}', exc) from exc
    try:
        answers_by_qid = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in adata["annotations"]}
    except (KeyError, TypeError) as exc:
        raise bad_format(apath, dataset, '{"annotations": [{"question_id", "answers": [{"answer"}]}]}',
                         exc) from exc
    items = []
    for q in questions[: len(questions) if limit is None else limit]:
        try:
            qid, image_id, text = q["question_id"], q["image_id"], q["question"]
        except (KeyError, TypeError) as exc:
            raise bad_format(qpath, dataset, 'questions with "question_id", "image_id", "question"', exc) from exc
        if qid not in answers_by_qid:
            raise ValueError(f"{dataset}: question {qid} of {qpath} has no entry in {apath}; "
                             "are both files from the same split?")
        items.append(VQAItem(question_id=str(qid), image_path=idir / image_pattern.format(image_id=image_id),
                             question=text, answers=answers_by_qid[qid]))
    check_images((it.image_path for it in items), dataset, f"{config_key}.image_dir")
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
    check_limit(limit)
    qpath = require_file(questions_json, "questions", dataset, f"{config_key}.questions")
    idir = require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    data = read_json(qpath, dataset)
    if not isinstance(data, dict):
        raise bad_format(qpath, dataset, "a JSON object mapping question ids to questions")
    items = []
    for qid, q in list(data.items())[: len(data) if limit is None else limit]:
        try:
            items.append(VQAItem(question_id=str(qid), image_path=idir / f"{q['imageId']}.jpg",
                                 question=q["question"], answers=[q["answer"]]))
        except (KeyError, TypeError) as exc:
            raise bad_format(qpath, dataset, 'questions with "imageId", "question", "answer"', exc) from exc
    check_images((it.image_path for it in items), dataset, f"{config_key}.image_dir")
    return items


def load_textvqa(questions_json: PathLike, image_dir: PathLike, limit: int | None = None, *,
                  config_key: str = "evaluation.textvqa") -> list[VQAItem]:
    """TextVQA val: ``TextVQA_0.5.1_val.json`` ({"data": [{"question_id", "image_id", "question",
    "answers": [10 answers]}]}), images ``{image_id}.jpg`` (the val images sit in train_images/).
    Items follow the file."""
    dataset = "TextVQA"
    check_limit(limit)
    qpath = require_file(questions_json, "questions", dataset, f"{config_key}.questions")
    idir = require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    data = read_json(qpath, dataset)
    expected = '{"data": [{"question_id", "image_id", "question", "answers"}]}'
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise bad_format(qpath, dataset, expected)
    items = []
    for q in data["data"][: len(data["data"]) if limit is None else limit]:
        try:
            items.append(VQAItem(question_id=str(q["question_id"]), image_path=idir / f"{q['image_id']}.jpg",
                                 question=q["question"], answers=list(q["answers"])))
        except (KeyError, TypeError) as exc:
            raise bad_format(qpath, dataset, expected, exc) from exc
    check_images((it.image_path for it in items), dataset, f"{config_key}.image_dir")
    return items


def load_textvqa_ocr(ocr_json: PathLike, config_key: str = "evaluation.textvqa") -> dict[str, list[str]]:
    """Rosetta OCR tokens per image (``TextVQA_Rosetta_OCR_v0.2_val.json``: {"data": [{"image_id",
    "ocr_tokens": [...]}]}), for the prompt LLaVA-1.5 evaluates TextVQA with."""
    dataset = "TextVQA"
    path = require_file(ocr_json, "Rosetta OCR", dataset, f"{config_key}.ocr_tokens")
    data = read_json(path, dataset)
    try:
        return {str(d["image_id"]): list(d["ocr_tokens"]) for d in data["data"]}
    except (KeyError, TypeError) as exc:
        raise bad_format(path, dataset, '{"data": [{"image_id", "ocr_tokens": [...]}]}', exc) from exc


# ----------------------------------------------------------------------------- captions / retrieval


def _karpathy_images(dataset_json: PathLike, split: str, dataset: str, config_key: str) -> tuple[Path, list[dict]]:
    path = require_file(dataset_json, "Karpathy split", dataset, f"{config_key}.karpathy_json")
    data = read_json(path, dataset)
    try:
        images = [im for im in data["images"] if im["split"] == split]
    except (KeyError, TypeError) as exc:
        raise bad_format(path, dataset, '{"images": [{"split", "filename", "sentences"}]}', exc) from exc
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
    check_limit(limit)
    root = require_dir(image_root, "image root", dataset, f"{config_key}.image_root")
    path, images = _karpathy_images(dataset_json, split, dataset, config_key)
    items = []
    for im in take(images, limit):
        try:
            image_id = im["cocoid"] if "cocoid" in im else im["imgid"]
            items.append(CaptionItem(image_id=str(image_id), image_path=_karpathy_image_path(root, im),
                                     references=[s["raw"].strip() for s in im["sentences"]]))
        except (KeyError, TypeError) as exc:
            raise bad_format(path, dataset, 'images with "cocoid", "filename", "sentences": [{"raw"}]', exc) from exc
    check_images((it.image_path for it in items), dataset, f"{config_key}.image_root")
    return items


def _coco_caption_format(path: Path, dataset: str) -> tuple[list[dict], dict[Any, list[str]]]:
    data = read_json(path, dataset)
    try:
        images = list(data["images"])
        caps: dict[Any, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        if any("id" not in im or "file_name" not in im for im in images):
            raise KeyError("an image entry lacks 'id' or 'file_name'")
    except (KeyError, TypeError) as exc:
        raise bad_format(path, dataset, '{"images": [{"id", "file_name"}], "annotations": '
                         '[{"image_id", "caption"}]}', exc) from exc
    return images, caps


def load_nocaps(annotations_json: PathLike, image_dir: PathLike, limit: int | None = None, *,
                config_key: str = "evaluation.nocaps") -> list[CaptionItem]:
    """nocaps val (``nocaps_val_4500_captions.json``, COCO caption format). Items follow the
    ``images`` list; ``domain`` is the image's nocaps domain when the file gives one."""
    dataset = "nocaps"
    check_limit(limit)
    path = require_file(annotations_json, "annotations", dataset, f"{config_key}.annotations")
    idir = require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    images, caps = _coco_caption_format(path, dataset)
    items = [CaptionItem(image_id=str(im["id"]), image_path=idir / im["file_name"],
                         references=caps.get(im["id"], []), domain=im.get("domain"))
             for im in take(images, limit)]
    empty = [it.image_id for it in items if not it.references]
    if empty:
        raise ValueError(f"{dataset}: image {empty[0]} in {path} has no captions; "
                         "use the captions file (nocaps_val_4500_captions.json), not the image-info file")
    check_images((it.image_path for it in items), dataset, f"{config_key}.image_dir")
    return items


def load_flickr30k_retrieval(dataset_json: PathLike, image_dir: PathLike, split: str = "test",
                             limit: int | None = None, *,
                             config_key: str = "evaluation.flickr30k") -> RetrievalSet:
    """Flickr30k retrieval from Karpathy's ``dataset_flickr30k.json`` (test: 1000 images x 5
    captions). ``limit`` caps the number of images (with all their captions). Images and texts
    follow the file order; ``img_of_text``/``texts_of_image`` give the ground-truth matches."""
    dataset = "Flickr30k"
    check_limit(limit)
    idir = require_dir(image_dir, "image", dataset, f"{config_key}.image_dir")
    path, images = _karpathy_images(dataset_json, split, dataset, config_key)
    out = RetrievalSet(image_paths=[], texts=[], img_of_text=[], texts_of_image=[])
    for i, im in enumerate(take(images, limit)):
        try:
            out.image_paths.append(_karpathy_image_path(idir, im))
            ids = []
            for s in im["sentences"]:
                ids.append(len(out.texts))
                out.texts.append(s["raw"].strip())
                out.img_of_text.append(i)
        except (KeyError, TypeError) as exc:
            raise bad_format(path, dataset, 'images with "filename", "sentences": [{"raw"}]', exc) from exc
        out.texts_of_image.append(ids)
    check_images(out.image_paths, dataset, f"{config_key}.image_dir")
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
    dataset = "ImageNet"
    check_limit(limit)
    root = require_dir(val_dir, "validation", dataset, f"{config_key}.val_dir")
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
    return take(items, limit)


__all__ = [
    "VQAItem", "CaptionItem", "RetrievalSet", "ClassificationItem", "load_vqav2", "load_okvqa", "load_gqa",
    "load_textvqa", "load_textvqa_ocr",
    "load_coco_karpathy", "load_nocaps", "load_flickr30k_retrieval", "load_imagenet_val",
]
