"""BLIP retrieval (family blip_retrieval): contrastive loss plus the matching head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ecoflap.data.captions import blip_pre_caption
from ecoflap.models.base import Stack, at_least_fp32
from ecoflap.models.vision_language import VisionLanguageAdapter, contrastive_loss


@dataclass(frozen=True)
class BlipRetrievalAdapter(VisionLanguageAdapter):
    """BlipForImageTextRetrieval: image-text contrastive loss plus the matching head on the
    true pairs, so the text encoder's cross-attention layers also see calibration data."""

    family: str = "blip_retrieval"
    temperature: float = 0.07

    def stacks(self, model):
        # the loss runs the text encoder twice: text only (contrastive), then with
        # cross-attention to the image (matching); both runs are calibration data
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("text_encoder", "text_encoder.encoder.layer", "language", calls=2, mask_key="attention_mask")]

    def calibration_batch(self, model, procs, images, captions, prompt):
        enc = self._text(procs, captions)
        return {"pixel_values": procs.pixels(images), "input_ids": enc.input_ids,
                "attention_mask": enc.attention_mask}

    @staticmethod
    def _text(procs, texts):
        # as LAVIS's BLIP retrieval: blip_caption text processing, at most 35 tokens
        return procs.tokenizer([blip_pre_caption(t) for t in texts], padding=True, truncation=True, max_length=35,
                               return_tensors="pt")

    def loss(self, model, batch):
        itc = model(**batch, use_itm_head=False).itm_score / self.temperature
        itm = at_least_fp32(model(**batch, use_itm_head=True).itm_score)
        match = torch.ones(itm.shape[0], dtype=torch.long, device=itm.device)
        return contrastive_loss(itc) + F.cross_entropy(itm, match)

    @torch.no_grad()
    def image_embeddings(self, model, procs, images):
        pix = procs.pixels(images).to(model.device, model.dtype)
        emb = model.vision_model(pixel_values=pix).last_hidden_state
        return F.normalize(at_least_fp32(model.vision_proj(emb[:, 0])), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, model, procs, texts):
        enc = self._text(procs, texts).to(model.device)
        out = model.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        return F.normalize(at_least_fp32(model.text_proj(out[:, 0])), dim=-1)
