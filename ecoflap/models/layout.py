"""The prunable layers of a model and their sizes, read from a skeleton on the meta device
(no weights loaded, so it costs nothing even for a 7B model)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ecoflap.models.adapters import adapter_for, model_layout


def layout_of_folder(model_dir: str | Path, trust_remote_code: bool = False) -> dict[str, dict[str, int]]:
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model_layout(skeleton, adapter_for(skeleton))
