"""LLaVA (family llava): a CLIP / SigLIP vision tower -> a two-layer projector -> a LLaMA / Qwen2
decoder. One adapter serves LLaVA-1.5 (`LlavaForConditionalGeneration`), LLaVA-NeXT (AnyRes
tiles, `image_sizes`) and LLaVA-OneVision: the same module paths, and their processors already
give every tensor a per-example dimension.

LLaVA-1.5 and -NeXT read the image features from the second-to-last vision layer, so the last
vision block gets no gradient from the loss and no say in the outputs: its scores are zero, and
pruning it changes nothing the model computes (the allocation may give it the highest sparsity)."""
from __future__ import annotations

from dataclasses import dataclass

from ecoflap.models.chat_vlm import ChatVLMAdapter


@dataclass(frozen=True)
class LlavaAdapter(ChatVLMAdapter):
    family: str = "llava"
    vision_path: str = "model.vision_tower.encoder.layers"
    language_path: str = "model.language_model.layers"
