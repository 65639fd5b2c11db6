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


FAMILIES: dict[str, Family] = {
    "causal_lm": Family(("perplexity", "lm_eval"), ("language",), single_stack=True, image_calibration=False),
    "blip2": Family(("vqa", "caption"), ("vision", "qformer", "language")),
    "instructblip": Family(("vqa", "caption"), ("vision", "qformer", "language")),
    "blip2_retrieval": Family(("retrieval",), ("vision", "qformer")),
    "clip": Family(("retrieval", "classification"), ("vision", "language")),
    "blip_caption": Family(("caption",), ("vision", "language")),
    "blip_vqa": Family(("vqa",), ("vision", "language")),
    "blip_retrieval": Family(("retrieval",), ("vision", "language")),
}

TEXT_SOURCES = ("austen-emma", "c4")
IMAGE_SOURCES = ("cc3m", "coco")
