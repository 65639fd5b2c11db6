"""BLIP-2 retrieval (family blip2_retrieval): ViT + Q-Former with contrastive and matching heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ecoflap.data.calibration import widen_clear_of
from ecoflap.data.captions import blip_pre_caption
from ecoflap.models.base import Stack, at_least_fp32
from ecoflap.models.vision_language import VisionLanguageAdapter, contrastive_loss

# the batch entry marking the caption's real tokens in the Q-Former's text run (not a model input)
TEXT_MASK = "text_attention_mask"


@dataclass(frozen=True)
class Blip2RetrievalAdapter(VisionLanguageAdapter):
    """Blip2ForImageTextRetrieval (ViT + Q-Former, e.g. blip2-itm-vit-g): image-text
    contrastive loss; similarity = max over the query embeddings, as BLIP-2 scores ITC."""

    family: str = "blip2_retrieval"
    temperature: float = 0.07

    def stacks(self, model):
        # the Q-Former runs twice per forward: on the image queries, then on the caption; the
        # caption's padding stays out of the statistics of the text run (the image run's states
        # are never the caption's shape: calibration_batch pads the caption to another width)
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("qformer", "qformer.encoder.layer", "qformer", calls=2, mask_key=TEXT_MASK)]

    def _text(self, model, procs, texts):
        # as LAVIS's compute_sim_matrix: blip_caption text processing, at most 35 tokens
        return procs.tokenizer([blip_pre_caption(t) for t in texts], padding=True, truncation=True,
                               max_length=35, return_tensors="pt")

    def calibration_batch(self, model, procs, images, captions, prompt):
        enc = self._text(model, procs, captions)
        ids, mask = enc.input_ids, enc.attention_mask
        # the text mask is matched to a layer input by shape, and the image run hands the Q-Former
        # [batch, queries] and (to the cross-attention) [batch, ViT tokens] states: a caption width
        # equal to either would drop real positions of those, so such a width gets one more padding
        vision = model.config.vision_config
        taken = {model.config.num_query_tokens, (vision.image_size // vision.patch_size) ** 2 + 1}
        ids, mask = widen_clear_of(ids, mask, taken, procs.tokenizer.pad_token_id or 0)
        text_mask = mask.clone()  # its own storage: the calibration file (safetensors) refuses shared tensors
        if model.config.image_token_index is not None:  # the model strips this prefix again
            q = model.config.num_query_tokens
            ids = torch.cat([torch.full((ids.shape[0], q), model.config.image_token_index), ids], 1)
            mask = torch.cat([torch.ones(ids.shape[0], q, dtype=mask.dtype), mask], 1)
        return {"pixel_values": procs.pixels(images), "input_ids": ids, "attention_mask": mask, TEXT_MASK: text_mask}

    @staticmethod
    def model_inputs(batch):
        """The batch without the entries that only mark padding for the statistics."""
        if TEXT_MASK not in batch:  # without it the caption's padding would enter the Q-Former's statistics
            raise ValueError(f"the calibration batch has no {TEXT_MASK!r}: the calibration file predates it; delete "
                             "results/<model>/calibration.safetensors and rerun calibration")
        return {k: v for k, v in batch.items() if k != TEXT_MASK}

    def loss(self, model, batch):
        # logits_per_image are raw cosines here; BLIP-2 trains its contrastive loss on
        # cosine / temperature (learned, initialised at 0.07; the HF class does not keep it)
        out = model(**self.model_inputs(batch), use_image_text_matching_head=False)
        return contrastive_loss(out.logits_per_image / self.temperature)

    @torch.no_grad()
    def image_embeddings(self, model, procs, images):
        pix = procs.pixels(images).to(model.device, model.dtype)
        image = model.vision_model(pixel_values=pix).last_hidden_state
        queries = model.query_tokens.expand(image.shape[0], -1, -1)
        mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        q = model.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=mask)
        proj = model.vision_projection  # the Q-Former stays fp32 when the model loads in fp16
        return F.normalize(at_least_fp32(proj(q.last_hidden_state.to(proj.weight.dtype))), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, model, procs, texts):
        enc = self._text(model, procs, texts).to(model.device)
        emb = model.embeddings(input_ids=enc.input_ids)
        out = model.qformer(query_embeds=emb, query_length=0, attention_mask=enc.attention_mask)
        proj = model.text_projection
        return F.normalize(at_least_fp32(proj(out.last_hidden_state[:, 0].to(proj.weight.dtype))), dim=-1)

    @torch.no_grad()
    def vision_states(self, model, procs, images):
        """The ViT's output for the matching head (kept per image for re-ranking)."""
        pix = procs.pixels(images).to(model.device, model.dtype)
        return model.vision_model(pixel_values=pix).last_hidden_state

    @torch.no_grad()
    def match_logits(self, model, procs, vision, texts):
        """Image-text matching score of each (vision[i], texts[i]) as LAVIS's compute_itm gives
        it for re-ranking: the "match" logit of the ITM head, averaged over the query outputs."""
        enc = self._text(model, procs, texts).to(model.device)
        queries = model.query_tokens.expand(vision.shape[0], -1, -1)
        emb = model.embeddings(input_ids=enc.input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(queries.shape[:-1], dtype=enc.attention_mask.dtype, device=model.device),
                          enc.attention_mask], 1)
        image_mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        out = model.qformer(query_embeds=emb, query_length=queries.shape[1], attention_mask=mask,
                            encoder_hidden_states=vision, encoder_attention_mask=image_mask).last_hidden_state
        head = model.itm_head
        logits = at_least_fp32(head(out[:, :queries.shape[1]].to(head.weight.dtype)))
        return logits[:, :, 1].mean(1)

    def similarity(self, image_emb, text_emb):
        return torch.einsum("iqd,td->itq", image_emb, text_emb).amax(-1)
