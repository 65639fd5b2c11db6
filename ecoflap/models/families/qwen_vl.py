"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (family qwen_vl): a native-resolution ViT (`model.visual.blocks`) ->
a patch merger -> a Qwen2 decoder with multimodal rotary positions (M-RoPE).

Quirks, kept here:
* calibration images are scaled down to at most 448 x 448 pixels' worth first (evaluation keeps
  the native resolution);
* the processor returns every image's patches in one [patches, values] tensor; image i owns
  prod(image_grid_thw[i]) rows. They are stored per example (ChatVLMAdapter.pack) and joined
  again before the model runs;
* Qwen2.5-VL's vision blocks attend within windows except the `fullatt_block_indexes` ones: each
  block is called with its own `cu_seqlens` (segment bounds), and the hidden states arrive in
  window order. The engine records every block's own arguments (per_block_inputs);
* `mm_token_type_ids` must stay in the batch: without it Qwen2.5-VL silently falls back to 1-D
  positions (Qwen2-VL raises);
* Qwen3-VL's DeepStack: features taken from three vision blocks (`deepstack_visual_indexes`),
  each through a merger of its own, are added to the image positions of the language model's
  hidden states after its first three layers, outside any layer. The language stack declares
  it (Stack.injects_between_blocks): the capture records what is added after each block and
  the walk adds it to the pruned block's outputs. The deepstack mergers, like the main merger,
  stay dense."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ecoflap.models.base import Stack
from ecoflap.models.chat_vlm import ChatVLMAdapter


@dataclass(frozen=True)
class QwenVLAdapter(ChatVLMAdapter):
    family: str = "qwen_vl"
    vision_path: str = "model.visual.blocks"
    language_path: str = "model.language_model.layers"
    deepstack: bool = False  # Qwen3-VL: vision features added between the first language blocks
    # native resolution: a 12-megapixel photo would be 16k patches of 1,176 values in the stored
    # calibration batch; 448 x 448 pixels (1,024 patches, 256 image tokens) bounds it
    calibration_max_pixels: int = 448 * 448

    def stacks(self, model: nn.Module) -> list[Stack]:
        vision, language = super().stacks(model)
        if self.deepstack:
            language = replace(language, injects_between_blocks=True)
        return [vision, language]

    def rows_per_example(self, model: nn.Module, encoded: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        # one image per example: its patches are prod(t, h, w) rows of pixel_values
        return {"pixel_values": encoded["image_grid_thw"].prod(-1).tolist()}
