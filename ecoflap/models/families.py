"""The model families config.yaml can name, without importing torch (the config is
validated before any job is planned): what each can be evaluated on, which sub-models it
has, and whether it is one stack of blocks (which the block-rerunning scorers need)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    tasks: tuple[str, ...]
    submodels: tuple[str, ...]
    single_stack: bool = False
    image_calibration: bool = True
    prefix_calibration: bool = False  # ECoFLaP's prefix/target captioning loss (calibration protocol ecoflap)


TEXT_EVALS = ("perplexity", "lm_eval")  # evaluation entries named by their task

FAMILIES: dict[str, Family] = {
    "causal_lm": Family(TEXT_EVALS, ("language",), single_stack=True, image_calibration=False),
    "blip2": Family(("vqa", "caption"), ("vision", "qformer", "language"), prefix_calibration=True),
    "instructblip": Family(("vqa", "caption"), ("vision", "qformer", "language"), prefix_calibration=True),
    "blip2_retrieval": Family(("retrieval",), ("vision", "qformer")),
    "clip": Family(("retrieval", "classification"), ("vision", "language")),
    "blip_caption": Family(("caption",), ("vision", "language")),
    "blip_vqa": Family(("vqa",), ("vision", "language")),
    "blip_retrieval": Family(("retrieval",), ("vision", "language")),
}

TEXT_SOURCES = ("austen-emma", "c4")
IMAGE_SOURCES = ("cc3m", "coco", "fashion-mnist")

# vision-language evaluation datasets: their task, and the files (keys of the evaluation entry) they read
DATASET_TASK = {"vqav2": "vqa", "okvqa": "vqa", "gqa": "vqa", "nocaps": "caption", "coco_karpathy": "caption",
                "flickr30k": "retrieval", "imagenet": "classification", "fashion_mnist": "classification"}
# the accuracy protocol behind each VQA dataset's published numbers (ecoflap/evaluation/metrics.py)
DEFAULT_PROTOCOL = {"vqav2": "vqaeval2016", "okvqa": "vqaeval2016", "gqa": "lavis_gqa"}
PROTOCOLS_OF_DATASET = {"vqav2": ("vqaeval2016", "vqaeval2021"), "okvqa": ("vqaeval2016", "vqaeval2021"),
                        "gqa": ("lavis_gqa", "lavis_gqa_2023_12")}
DATASET_FILES = {"vqav2": ("questions", "annotations", "image_dir"), "okvqa": ("questions", "annotations", "image_dir"),
                 "gqa": ("questions", "image_dir"), "nocaps": ("annotations", "image_dir"),
                 "coco_karpathy": ("karpathy_json", "image_root"), "flickr30k": ("karpathy_json", "image_dir"),
                 "imagenet": ("val_dir",), "fashion_mnist": ()}
