"""InternVL, in transformers' native format (family internvl; `InternVLForConditionalGeneration`,
the `*-hf` checkpoints): an InternViT (`model.vision_tower.encoder.layer`, with layer scale) run on
the image's tiles plus a thumbnail -> pixel shuffle and a projector -> a Qwen2 decoder.

Quirk, kept here: the processor returns the tiles of every image in one [tiles, 3, H, W] tensor;
example i owns (its image tokens / tokens per tile) of them. They are stored per example
(ChatVLMAdapter.pack) and joined again before the model runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecoflap.models.chat_vlm import ChatVLMAdapter


def tokens_per_tile(model: nn.Module) -> int:
    if getattr(model.config, "image_seq_length", None):
        return int(model.config.image_seq_length)
    vision = model.config.vision_config
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return int((size // patch) ** 2 * model.config.downsample_ratio ** 2)


@dataclass(frozen=True)
class InternVLAdapter(ChatVLMAdapter):
    family: str = "internvl"
    vision_path: str = "model.vision_tower.encoder.layer"
    language_path: str = "model.language_model.layers"

    def rows_per_example(self, model: nn.Module, encoded: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        image_tokens = (encoded["input_ids"] == self._image_token_id(model)).sum(1)
        return {"pixel_values": (image_tokens // tokens_per_tile(model)).tolist()}
