"""Gemma 3 (family gemma3): a SigLIP vision tower -> an average-pooling projector (a matmul with
a parameter, no Linear: nothing to prune there) -> the Gemma 3 decoder, whose layers alternate
sliding-window and global attention (`layer_types`) with different rotary bases.

Quirks, kept here: each decoder layer is called with the mask and rotary tables of its own kind,
so the engine records every block's own arguments (per_block_inputs); `token_type_ids` stays in
the batch (it makes attention bidirectional inside an image; without it the logits change); the
token whose embeddings the image replaces is `config.image_token_id` (<image_soft_token>), not the
processor's `image_token_id` (<start_of_image>). The processor wants one list of images per
example."""
from __future__ import annotations

from dataclasses import dataclass

from ecoflap.models.chat_vlm import ChatVLMAdapter


@dataclass(frozen=True)
class Gemma3Adapter(ChatVLMAdapter):
    family: str = "gemma3"
    vision_path: str = "model.vision_tower.encoder.layers"
    language_path: str = "model.language_model.layers"
    nested_images: bool = True
