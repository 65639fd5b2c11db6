"""Idefics3 and SmolVLM (family idefics3): a SigLIP vision encoder run on the image's tiles plus a
downscaled global view -> a pixel-shuffle connector -> a LLaMA-family decoder (`model.text_model`).
The processor pads every example to the same number of tiles (`pixel_attention_mask` marks the
real pixels) and wants one list of images per example. SmolVLM's processor needs the `num2words`
package."""
from __future__ import annotations

from dataclasses import dataclass

from ecoflap.models.chat_vlm import ChatVLMAdapter


@dataclass(frozen=True)
class Idefics3Adapter(ChatVLMAdapter):
    family: str = "idefics3"
    vision_path: str = "model.vision_model.encoder.layers"
    language_path: str = "model.text_model.layers"
    nested_images: bool = True
