"""Checkpoints in open_clip's format (open_clip_config.json + weights), the format EVA-CLIP comes in
(family eva_clip, models/families/eva_clip.py): telling such a folder apart, building the
architecture it describes, loading its weights strictly, and open_clip's tokenizer and image
transform as the pipeline's processors.

open_clip needs torchvision, which the core environment cannot import beside the CPU torch
wheel, so these models run in their own environment (envs/requirements-eva.txt,
`workflow/scripts/setup_env.sh --eva`), named per model in the config (`models.<name>.python`).
open_clip is imported only inside the functions that build a model, and a missing open_clip is
an error that says which environment to use.

The download renames open_clip_model.safetensors to model.safetensors, so the shard reader, the
checksums and the pruned checkpoint treat the folder like any other.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoflap.data.imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES
from ecoflap.models.shards import INDEX_FILE, CheckpointFiles

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
NEEDS_ENV = ("this is an open_clip model (family eva_clip), and open_clip is not installed in this interpreter. "
             "Create its environment with `bash workflow/scripts/setup_env.sh --eva` (on a machine where "
             "torchvision installs beside torch) and set `models.<name>.python: .venv-eva/bin/python` for this "
             "model in the config (README, 'EVA-CLIP')")


def is_open_clip_folder(path: str | Path) -> bool:
    return (Path(path) / OPEN_CLIP_CONFIG).is_file()


@dataclass
class OpenClipConfig:
    """What the pipeline reads off `model.config` (transformers models carry one): the family's
    name for the registry, the classes the zero-shot head predicts, and open_clip's own config
    file, written back beside a pruned checkpoint."""

    source: dict[str, Any]  # open_clip_config.json as downloaded
    model_type: str = "open_clip"
    classnames: tuple[str, ...] = tuple(IMAGENET_CLASSNAMES)
    templates: tuple[str, ...] = tuple(IMAGENET_TEMPLATES)
    use_cache: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.classnames)

    def save_pretrained(self, out: str | Path) -> None:
        (Path(out) / OPEN_CLIP_CONFIG).write_text(json.dumps(self.source, indent=2))


def _open_clip():
    try:
        import open_clip  # only in the EVA environment (needs torchvision)
    except ImportError as exc:
        raise ImportError(NEEDS_ENV) from exc
    return open_clip


def _create(path: Path, device: str) -> nn.Module:
    """The architecture open_clip_config.json describes, registered under a private name through
    open_clip's public add_model_config, with random (or meta) weights."""
    open_clip = _open_clip()
    source = json.loads((path / OPEN_CLIP_CONFIG).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        name = "ecoflap-" + path.resolve().name.replace(".", "-")
        (Path(tmp) / f"{name}.json").write_text(json.dumps(source["model_cfg"]))
        open_clip.add_model_config(tmp)
        with torch.device(device):  # open_clip then moves it to `device` (a no-op on meta)
            model = open_clip.create_model(name, pretrained=None, device=device)
    model.config = OpenClipConfig(source)
    model.ecoflap_arch = name
    return model


def separate_qkv_bias(model: nn.Module) -> None:
    """timm's EVA attention adds its q/v biases through F.linear(x, qkv.weight, bias), which never
    calls the qkv Linear, so no hook would see its input (and Wanda/SparseGPT would prune it
    blind). timm's own switch `qkv_bias_separate` makes it call the Linear and add the bias after,
    the same sum in a different order."""
    for module in model.modules():
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True


def build_skeleton(path: str | Path) -> nn.Module:
    return _create(Path(path), "meta")


def load_open_clip(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's weights loaded strictly into open_clip's architecture (a missing or
    unexpected tensor is an error, as for transformers checkpoints)."""
    path = Path(path)
    model = _create(path, "cpu")
    files = CheckpointFiles(path)
    state = files.read(files.names())
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: the weights do not match {OPEN_CLIP_CONFIG} (missing {result.missing_keys[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}); re-run the download rule")
    separate_qkv_bias(model)
    return model.to(dtype).eval()


@dataclass
class OpenClipProcessors:
    """open_clip's tokenizer and evaluation transform (resize the shorter side, centre crop, the
    checkpoint's mean and std), in the shape `Processors` has."""

    tokenizer: Any
    preprocess: Any
    image_processor: Any = None  # calibration crops read their size from here (None: 224)

    def pixels(self, images: list) -> torch.Tensor:
        return torch.stack([self.preprocess(im) for im in images])

    def save_pretrained(self, out: str | Path) -> None:
        pass  # open_clip_config.json (written with the config) is all open_clip needs


def load_open_clip_processors(path: str | Path) -> OpenClipProcessors:
    open_clip = _open_clip()
    model = _create(Path(path), "meta")
    cfg = json.loads((Path(path) / OPEN_CLIP_CONFIG).read_text()).get("preprocess_cfg", {})
    size = model.visual.image_size
    preprocess = open_clip.image_transform(size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                                           interpolation=cfg.get("interpolation"), resize_mode=cfg.get("resize_mode"))
    return OpenClipProcessors(open_clip.get_tokenizer(model.ecoflap_arch), preprocess)


def as_open_clip_folder(folder: Path) -> None:
    """A downloaded open_clip hub repository made loadable like the others: its safetensors
    weights under the name the shard reader expects (timm's vision-only model.safetensors and
    config.json, which some repositories also hold, are set aside). A folder this pipeline wrote
    (a pruned checkpoint used as a local source) is left as it is."""
    if not (folder / OPEN_CLIP_WEIGHTS).is_file() and (folder / INDEX_FILE).is_file():
        return
    if not (folder / OPEN_CLIP_WEIGHTS).is_file():
        raise RuntimeError(f"{folder} holds {OPEN_CLIP_CONFIG} but no {OPEN_CLIP_WEIGHTS}; only safetensors "
                           "weights are read (open_clip_pytorch_model.bin is a pickle)")
    for other in ("model.safetensors", "config.json"):
        if (folder / other).exists():
            (folder / other).rename(folder / f"timm_{other}")
    shutil.move(folder / OPEN_CLIP_WEIGHTS, folder / "model.safetensors")


__all__ = ["OPEN_CLIP_CONFIG", "OpenClipConfig", "OpenClipProcessors", "as_open_clip_folder", "build_skeleton",
           "is_open_clip_folder", "load_open_clip", "load_open_clip_processors", "separate_qkv_bias"]
