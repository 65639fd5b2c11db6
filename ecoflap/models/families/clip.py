"""CLIP (family clip): two independent towers, image-text contrastive loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ecoflap.models.base import Stack, at_least_fp32
from ecoflap.models.vision_language import VisionLanguageAdapter


@dataclass(frozen=True)
class ClipAdapter(VisionLanguageAdapter):
    """CLIPModel: two independent towers; calibration loss = image-text contrastive loss."""

    family: str = "clip"

    def stacks(self, model):
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("text", "text_model.encoder.layers", "language", mask_key="attention_mask")]

    def _text(self, model, procs, texts):
        return procs.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                               max_length=model.config.text_config.max_position_embeddings)

    def calibration_batch(self, model, procs, images, captions, prompt):
        enc = self._text(model, procs, captions)
        return {"pixel_values": procs.pixels(images), "input_ids": enc.input_ids,
                "attention_mask": enc.attention_mask}

    def context_padded_batch(self, model, procs, images, captions):
        """Captions as OpenAI's clip.tokenize gives them, which the authors' CLIP calibration
        uses: every caption padded to the whole context with token 0 and no padding mask (the
        text tower's causal mask alone), so the padded positions enter the statistics. The
        pooled token is still the end-of-text token (the highest id, as CLIP's argmax picks)."""
        context = model.config.text_config.max_position_embeddings
        ids = procs.tokenizer(captions, truncation=True, max_length=context).input_ids
        padded = torch.zeros(len(ids), context, dtype=torch.long)
        for row, seq in enumerate(ids):
            padded[row, :len(seq)] = torch.tensor(seq)
        return {"pixel_values": procs.pixels(images), "input_ids": padded,
                "attention_mask": torch.ones_like(padded)}

    def loss(self, model, batch):
        """CLIP's symmetric contrastive loss, from the model's logits cast to float32 first, as the
        authors' CoOp/trainers/zsclip.py:86-89 computes it from fp16 logits. transformers' own loss
        (return_loss) is the same sum in the model's dtype: in float16 it rounds the loss to steps of
        0.001-0.002 (losses of 1-4), coarser than many zeroth-order differences. In float32 the two
        are equal, bit for bit."""
        logits = model(**batch).logits_per_image.float()
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    @torch.no_grad()
    def image_embeddings(self, model, procs, images):
        pix = procs.pixels(images).to(model.device, model.dtype)
        pooled = model.vision_model(pixel_values=pix).pooler_output
        return F.normalize(at_least_fp32(model.visual_projection(pooled)), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, model, procs, texts):
        enc = self._text(model, procs, texts).to(model.device)
        pooled = model.text_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output
        return F.normalize(at_least_fp32(model.text_projection(pooled)), dim=-1)
