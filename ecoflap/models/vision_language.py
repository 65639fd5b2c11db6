"""What the vision-language families (`models/families/`) share, over the native
transformers classes (no LAVIS). Each family's adapter says, for its model class:
  * the stacks of prunable blocks in data-flow order (vision encoder, Q-Former, language
    model encoder/decoder): the engine prunes them in that order, so the language model is
    calibrated on inputs coming from the already pruned vision side;
  * how an image-caption pair becomes a calibration batch and a loss (captioning
    language-model loss for BLIP-2 / InstructBLIP / BLIP, image-text contrastive loss for
    CLIP and the retrieval heads);
  * how the evaluation tasks it supports use the model (generation for VQA and captioning,
    normalised embeddings for retrieval and zero-shot classification).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecoflap.models.base import Adapter, Batch, Stack, at_least_fp32
from ecoflap.models.families.decoder import decoder_adapter
from ecoflap.models.processors import Processors


def token_ids(tokenizer: Any, text: str, special: bool = True, max_length: int | None = None) -> list[int]:
    if max_length is None:
        return tokenizer(text, add_special_tokens=special).input_ids
    # as LAVIS tokenises with truncation=True, max_length=...: special tokens kept, text cut
    return tokenizer(text, add_special_tokens=special, truncation=True, max_length=max_length).input_ids


def contrastive_loss(sim: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over an [images, texts] logit matrix with matched pairs on the diagonal."""
    sim = at_least_fp32(sim)
    target = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


class VisionLanguageAdapter(Adapter):
    """Common plumbing; subclasses fill in stacks, batches and task hooks."""

    vqa_prompt: str = "Question: {} Short answer:"  # BLIP-2's zero-shot VQA prompt (a family may differ)
    # new tokens for a caption when its entry sets no max_new_tokens; None: the checkpoint's
    # generation_config decides (the chat VLMs set a sentence's worth: their default answer is short)
    caption_max_new_tokens = None

    def calibration_batch(self, model: nn.Module, procs: Processors, images: list, captions: list[str],
                          prompt: str) -> Batch:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return at_least_fp32(model(**batch).loss)

    # evaluation hooks (only the ones in `tasks` are implemented)
    def generate(self, model: nn.Module, procs: Processors, images: list, prompts: list[str],
                 gen_kwargs: dict[str, Any]) -> list[str]:
        raise NotImplementedError(f"{self.family} does not generate text")

    def image_embeddings(self, model: nn.Module, procs: Processors, images: list) -> torch.Tensor:
        raise NotImplementedError(f"{self.family} has no image embeddings")

    def text_embeddings(self, model: nn.Module, procs: Processors, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.family} has no text embeddings")

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """[images, texts] similarity of normalised embeddings."""
        return image_emb @ text_emb.t()


def language_stacks(model: nn.Module) -> list[Stack]:
    """The language model inside BLIP-2 / InstructBLIP: a T5 encoder-decoder or a decoder LM."""
    lm = model.language_model
    if lm.config.is_encoder_decoder:
        return [Stack("language_encoder", "language_model.encoder.block", "language", per_block_inputs=True,
                      mask_key="attention_mask"),
                Stack("language_decoder", "language_model.decoder.block", "language", per_block_inputs=True,
                      mask_key="labels", cross_mask_key="attention_mask")]
    return [Stack("language", "language_model." + decoder_adapter(lm).blocks_path, "language",
                  mask_key="attention_mask")]
