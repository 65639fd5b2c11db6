"""BLIP VQA (family blip_vqa): ViT -> question encoder -> answer decoder."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ecoflap.models.base import Stack
from ecoflap.models.vision_language import VisionLanguageAdapter


@dataclass(frozen=True)
class BlipVqaAdapter(VisionLanguageAdapter):
    """BlipForQuestionAnswering: ViT -> question encoder -> answer decoder. Calibrated as a
    captioning question ("what does the picture show?" answered by the caption)."""

    family: str = "blip_vqa"
    question: str = "what does the picture show?"
    vqa_prompt: str = "{}"  # BLIP VQA was trained on bare questions

    def stacks(self, model):
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("text_encoder", "text_encoder.encoder.layer", "language", mask_key="attention_mask"),
                Stack("text_decoder", "text_decoder.bert.encoder.layer", "language",
                      mask_key="decoder_attention_mask")]

    def calibration_batch(self, model, procs, images, captions, prompt):
        tok = procs.tokenizer
        q = tok([prompt or self.question] * len(captions), padding=True, return_tensors="pt")
        a = tok(captions, padding=True, return_tensors="pt")
        # the answer decoder starts from [DEC] (as generate does), and reads these ids as its
        # inputs, so padding stays a real token id there and is masked only in the labels
        dec = a.input_ids.clone()
        dec[:, 0] = model.config.text_config.bos_token_id
        return {"pixel_values": procs.pixels(images), "input_ids": q.input_ids, "attention_mask": q.attention_mask,
                "decoder_input_ids": dec, "decoder_attention_mask": a.attention_mask,
                "labels": dec.masked_fill(a.attention_mask == 0, -100)}

    @torch.no_grad()
    def generate(self, model, procs, images, prompts, gen_kwargs):
        """Questions of equal token length are answered together, without padding: the answer
        decoder's cross-attention reads every question position (BlipForQuestionAnswering.generate
        hands it an all-ones mask, and transformers 5's BLIP text layers drop the cross-attention
        mask anyway), so in a padded batch an answer would depend on the other questions in it."""
        pix = procs.pixels(images).to(model.device, model.dtype)
        rows = procs.tokenizer(list(prompts)).input_ids
        answers: list[str] = [""] * len(rows)
        for width in sorted({len(r) for r in rows}):
            idx = [i for i, r in enumerate(rows) if len(r) == width]
            ids = torch.tensor([rows[i] for i in idx], device=model.device)
            out = model.generate(pixel_values=pix[idx], input_ids=ids, attention_mask=torch.ones_like(ids),
                                 **gen_kwargs)
            for i, text in zip(idx, procs.tokenizer.batch_decode(out, skip_special_tokens=True)):
                answers[i] = text.strip()
        return answers
