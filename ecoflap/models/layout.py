"""The prunable layers of a model and their sizes, read from a skeleton on the meta device
(no weights loaded, so it costs nothing even for a 7B model)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from ecoflap.models.base import model_layout
from ecoflap.models.open_clip_format import build_skeleton, is_open_clip_folder
from ecoflap.models.registry import adapter_for, model_class


def skeleton_of_folder(model_dir: str | Path, trust_remote_code: bool = False) -> nn.Module:
    if is_open_clip_folder(model_dir):
        return build_skeleton(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    cls = model_class(model_dir, trust_remote_code)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls(config)


def layout_of_folder(model_dir: str | Path, trust_remote_code: bool = False) -> dict:
    """{"layout": {block: {layer: size}}, "submodel_of_block": {block: sub-model}, "family": the config
    family (catalog.FAMILIES), "architecture": the transformers class}"""
    skeleton = skeleton_of_folder(model_dir, trust_remote_code)
    adapter = adapter_for(skeleton)
    return {"layout": model_layout(skeleton, adapter), "submodel_of_block": adapter.submodel_of_block(skeleton),
            "family": adapter.family, "architecture": type(skeleton).__name__}
