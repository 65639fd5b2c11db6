"""BLIP captioning (family blip_caption): ViT -> BERT decoder with cross-attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ecoflap.models.base import Stack
from ecoflap.data.calibration import mask_rows, pad_rows
from ecoflap.models.vision_language import VisionLanguageAdapter, token_ids


@dataclass(frozen=True)
class BlipCaptionAdapter(VisionLanguageAdapter):
    """BlipForConditionalGeneration: ViT -> BERT decoder with cross-attention."""

    family: str = "blip_caption"

    def stacks(self, model):
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("text_decoder", "text_decoder.bert.encoder.layer", "language", mask_key="attention_mask")]

    def calibration_batch(self, model, procs, images, captions, prompt):
        tok = procs.tokenizer
        n_prompt = len(token_ids(tok, prompt)) - 1 if prompt else 1  # minus [SEP]; the first token is BOS
        rows = [token_ids(tok, (prompt + " " + c).strip()) for c in captions]
        for r in rows:  # the decoder starts from [DEC], not [CLS] (as BLIP trains and generates)
            r[0] = model.config.text_config.bos_token_id
        labels = pad_rows([[-100] * n_prompt + r[n_prompt:] for r in rows], -100)
        return {"pixel_values": procs.pixels(images), "input_ids": pad_rows(rows, tok.pad_token_id or 0),
                "attention_mask": mask_rows(rows), "labels": labels}

    @torch.no_grad()
    def generate(self, model, procs, images, prompts, gen_kwargs):
        pix = procs.pixels(images).to(model.device, model.dtype)
        if any(prompts):  # BLIP replaces [CLS] by its BOS and drops the final [SEP] itself
            enc = procs.tokenizer(prompts, padding=True, return_tensors="pt").to(model.device)
            out = model.generate(pixel_values=pix, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 **gen_kwargs)
        else:
            out = model.generate(pixel_values=pix, **gen_kwargs)
        texts = procs.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [t[len(p):].strip() if t.startswith(p.lower()) else t.strip() for t, p in zip(texts, prompts)]
