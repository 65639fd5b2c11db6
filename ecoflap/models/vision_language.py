"""Vision-language families over the native transformers classes (no LAVIS).

Each adapter says, for its model class:
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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ecoflap.data.captions import blip_pre_caption
from ecoflap.models.adapters import Adapter, Batch, Stack, at_least_fp32, decoder_adapter
from ecoflap.models.families import FAMILIES


@dataclass
class Processors:
    """What turns images and text into model inputs (saved beside the checkpoint)."""

    tokenizer: Any
    image_processor: Any = None
    qformer_tokenizer: Any = None  # InstructBLIP tokenises the instruction twice

    def pixels(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt").pixel_values

    def save_pretrained(self, out: Any) -> None:
        from pathlib import Path

        self.tokenizer.save_pretrained(out)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(Path(out) / "qformer_tokenizer")


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0)


def _ids(tokenizer: Any, text: str, special: bool = True, max_length: int | None = None) -> list[int]:
    if max_length is None:
        return tokenizer(text, add_special_tokens=special).input_ids
    # as LAVIS tokenises with truncation=True, max_length=...: special tokens kept, text cut
    return tokenizer(text, add_special_tokens=special, truncation=True, max_length=max_length).input_ids


def _contrastive(sim: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over an [images, texts] logit matrix with matched pairs on the diagonal."""
    sim = at_least_fp32(sim)
    target = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


class VisionLanguageAdapter(Adapter):
    """Common plumbing; subclasses fill in stacks, batches and task hooks."""

    @property
    def tasks(self) -> tuple[str, ...]:  # type: ignore[override]
        return FAMILIES[self.family].tasks

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


def _language_stacks(model: nn.Module) -> list[Stack]:
    """The language model inside BLIP-2 / InstructBLIP: a T5 encoder-decoder or a decoder LM."""
    lm = model.language_model
    if lm.config.is_encoder_decoder:
        return [Stack("language_encoder", "language_model.encoder.block", "language", per_block_inputs=True,
                      mask_key="attention_mask"),
                Stack("language_decoder", "language_model.decoder.block", "language", per_block_inputs=True,
                      mask_key="labels")]
    return [Stack("language", "language_model." + decoder_adapter(lm).blocks_path, "language",
                  mask_key="attention_mask")]


@dataclass(frozen=True)
class Blip2Adapter(VisionLanguageAdapter):
    """Blip2ForConditionalGeneration and InstructBlipForConditionalGeneration: ViT -> Q-Former
    -> projection -> OPT / LLaMA-family decoder or FlanT5 encoder-decoder. The calibration
    loss is the captioning loss of the caption after an optional prompt; the image enters
    the language model as `num_query_tokens` image tokens in front of the text."""

    family: str = "blip2"
    instructed: bool = False  # InstructBLIP: the Q-Former also reads the prompt
    vqa_prompt: str = "Question: {} Short answer:"  # BLIP-2's zero-shot VQA prompt

    def stacks(self, model: nn.Module) -> list[Stack]:
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("qformer", "qformer.encoder.layer", "qformer")] + _language_stacks(model)

    def _image_tokens(self, model: nn.Module) -> list[int]:
        token = getattr(model.config, "image_token_index", None)
        if token is None:
            raise ValueError("this checkpoint's config has no image_token_index (it predates transformers' image "
                             "tokens for BLIP-2); use a newer revision of the checkpoint")
        return [token] * model.config.num_query_tokens

    def _encode(self, model: nn.Module, procs: Processors, images: list, prompts: list[str],
                targets: list[str] | None, max_length: int | None = None, joiner: str = " ") -> Batch:
        tok = procs.tokenizer
        image = self._image_tokens(model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batch: Batch = {"pixel_values": procs.pixels(images)}
        if model.config.text_config.is_encoder_decoder:
            rows = [image + _ids(tok, p, max_length=max_length) for p in prompts]
            if targets is not None:
                batch["labels"] = _pad([_ids(tok, t, max_length=max_length) for t in targets], -100)
        else:
            prompt_rows = [image + _ids(tok, p) for p in prompts]
            if targets is None:
                rows = prompt_rows
            else:
                rows = [image + _ids(tok, (p + joiner + t).strip()) for p, t in zip(prompts, targets)]
                if tok.eos_token_id is not None:
                    rows = [r + [tok.eos_token_id] for r in rows]
                batch["labels"] = _pad([[-100] * len(pr) + r[len(pr):] for pr, r in zip(prompt_rows, rows)], -100)
        if targets is None and not model.config.text_config.is_encoder_decoder:
            # generation continues from the end of the prompt: pad on the left
            width = max(len(r) for r in rows)
            batch["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            batch["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        else:
            batch["input_ids"], batch["attention_mask"] = _pad(rows, pad), _mask(rows)
        if self.instructed:
            if procs.qformer_tokenizer is None:
                raise ValueError("InstructBLIP needs its Q-Former tokenizer (qformer_tokenizer/ beside the checkpoint); "
                                 "the language model's tokenizer gives the Q-Former wrong token ids")
            qtok = procs.qformer_tokenizer
            qrows = [_ids(qtok, p) for p in prompts]
            batch["qformer_input_ids"] = _pad(qrows, qtok.pad_token_id or 0)
            batch["qformer_attention_mask"] = _mask(qrows)
        return batch

    def calibration_batch(self, model, procs, images, captions, prompt):
        return self._encode(model, procs, images, [prompt] * len(captions), captions)

    def prefix_calibration_batch(self, model: nn.Module, procs: Processors, images: list, prefixes: list[str],
                                 continuations: list[str], max_length: int = 32) -> Batch:
        """ECoFLaP's calibration loss (its LAVIS Blip2T5.forward on prefix CC3M): the image
        queries and the caption's prefix feed the encoder, the rest of the caption is the
        target, each tokenised with truncation to `max_length` (LAVIS's max_txt_len, 32). A
        decoder-only language model reads prefix + continuation and learns the continuation."""
        return self._encode(model, procs, images, prefixes, continuations, max_length=max_length, joiner="")

    @torch.no_grad()
    def generate(self, model, procs, images, prompts, gen_kwargs):
        batch = self._encode(model, procs, images, prompts, None)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        out = model.generate(**batch, **gen_kwargs)
        n_in = batch["input_ids"].shape[1]
        if not model.config.text_config.is_encoder_decoder and out.shape[1] > n_in \
                and torch.equal(out[:, :n_in], batch["input_ids"]):
            out = out[:, n_in:]  # some versions return the prompt in front of the answer
        return [s.strip() for s in procs.tokenizer.batch_decode(out, skip_special_tokens=True)]


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

    def loss(self, model, batch):
        return at_least_fp32(model(**batch, return_loss=True).loss)

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


@dataclass(frozen=True)
class Blip2RetrievalAdapter(VisionLanguageAdapter):
    """Blip2ForImageTextRetrieval (ViT + Q-Former, e.g. blip2-itm-vit-g): image-text
    contrastive loss; similarity = max over the query embeddings, as BLIP-2 scores ITC."""

    family: str = "blip2_retrieval"
    temperature: float = 0.07

    def stacks(self, model):
        # the Q-Former runs twice per forward: on the image queries, then on the caption
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("qformer", "qformer.encoder.layer", "qformer", calls=2)]

    def _text(self, model, procs, texts):
        # as LAVIS's compute_sim_matrix: blip_caption text processing, at most 35 tokens
        return procs.tokenizer([blip_pre_caption(t) for t in texts], padding=True, truncation=True,
                               max_length=35, return_tensors="pt")

    def calibration_batch(self, model, procs, images, captions, prompt):
        enc = self._text(model, procs, captions)
        ids, mask = enc.input_ids, enc.attention_mask
        if model.config.image_token_index is not None:  # the model strips this prefix again
            q = model.config.num_query_tokens
            ids = torch.cat([torch.full((ids.shape[0], q), model.config.image_token_index), ids], 1)
            mask = torch.cat([torch.ones(ids.shape[0], q, dtype=mask.dtype), mask], 1)
        return {"pixel_values": procs.pixels(images), "input_ids": ids, "attention_mask": mask}

    def loss(self, model, batch):
        # logits_per_image are raw cosines here; BLIP-2 trains its contrastive loss on
        # cosine / temperature (learned, initialised at 0.07; the HF class does not keep it)
        out = model(**batch, use_image_text_matching_head=False)
        return _contrastive(out.logits_per_image / self.temperature)

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


@dataclass(frozen=True)
class BlipCaptionAdapter(VisionLanguageAdapter):
    """BlipForConditionalGeneration: ViT -> BERT decoder with cross-attention."""

    family: str = "blip_caption"

    def stacks(self, model):
        return [Stack("vision", "vision_model.encoder.layers", "vision"),
                Stack("text_decoder", "text_decoder.bert.encoder.layer", "language", mask_key="attention_mask")]

    def calibration_batch(self, model, procs, images, captions, prompt):
        tok = procs.tokenizer
        n_prompt = len(_ids(tok, prompt)) - 1 if prompt else 1  # minus [SEP]; the first token is BOS
        rows = [_ids(tok, (prompt + " " + c).strip()) for c in captions]
        for r in rows:  # the decoder starts from [DEC], not [CLS] (as BLIP trains and generates)
            r[0] = model.config.text_config.bos_token_id
        labels = _pad([[-100] * n_prompt + r[n_prompt:] for r in rows], -100)
        return {"pixel_values": procs.pixels(images), "input_ids": _pad(rows, tok.pad_token_id or 0),
                "attention_mask": _mask(rows), "labels": labels}

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
        pix = procs.pixels(images).to(model.device, model.dtype)
        enc = procs.tokenizer(prompts, padding=True, return_tensors="pt").to(model.device)
        out = model.generate(pixel_values=pix, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             **gen_kwargs)
        return [t.strip() for t in procs.tokenizer.batch_decode(out, skip_special_tokens=True)]


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
        return _contrastive(itc) + F.cross_entropy(itm, match)

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


# transformers class -> adapter (BLIP checkpoints share one model_type across heads).
VISION_LANGUAGE: dict[str, VisionLanguageAdapter] = {
    "Blip2ForConditionalGeneration": Blip2Adapter(),
    "InstructBlipForConditionalGeneration": Blip2Adapter(family="instructblip", instructed=True),
    "Blip2ForImageTextRetrieval": Blip2RetrievalAdapter(),
    "CLIPModel": ClipAdapter(),
    "BlipForConditionalGeneration": BlipCaptionAdapter(),
    "BlipForQuestionAnswering": BlipVqaAdapter(),
    "BlipForImageTextRetrieval": BlipRetrievalAdapter(),
}

