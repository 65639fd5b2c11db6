"""BLIP-2 and InstructBLIP (families blip2, instructblip): ViT -> Q-Former -> projection ->
OPT / LLaMA-family decoder or FlanT5 encoder-decoder."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecoflap.data.calibration import mask_rows, pad_rows, widen_clear_of
from ecoflap.models.base import Batch, Stack, at_least_fp32
from ecoflap.models.processors import Processors
from ecoflap.models.vision_language import VisionLanguageAdapter, language_stacks, token_ids

# InstructBLIP: the calibration batch entry marking the instruction's real tokens in the Q-Former's
# text part, after the queries (not a model input)
QFORMER_MASK = "qformer_text_mask"


@dataclass(frozen=True)
class Blip2Adapter(VisionLanguageAdapter):
    """Blip2ForConditionalGeneration and InstructBlipForConditionalGeneration: ViT -> Q-Former
    -> projection -> OPT / LLaMA-family decoder or FlanT5 encoder-decoder. The calibration
    loss is the captioning loss of the caption after an optional prompt; the image enters
    the language model as `num_query_tokens` image tokens in front of the text."""

    family: str = "blip2"
    instructed: bool = False  # InstructBLIP: the Q-Former also reads the prompt

    def stacks(self, model: nn.Module) -> list[Stack]:
        # InstructBLIP's Q-Former reads the queries, then the instruction: the instruction's padding
        # stays out of the statistics (the queries are always real)
        qformer = Stack("qformer", "qformer.encoder.layer", "qformer", mask_key=QFORMER_MASK,
                        leading_real=model.config.num_query_tokens) if self.instructed else \
            Stack("qformer", "qformer.encoder.layer", "qformer")
        return [Stack("vision", "vision_model.encoder.layers", "vision"), qformer] + language_stacks(model)

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
            rows = [image + token_ids(tok, p, max_length=max_length) for p in prompts]
            if targets is not None:
                batch["labels"] = pad_rows([token_ids(tok, t, max_length=max_length) for t in targets], -100)
        else:
            prompt_rows = [image + token_ids(tok, p) for p in prompts]
            if targets is None:
                rows = prompt_rows
            else:
                rows = [image + token_ids(tok, (p + joiner + t).strip()) for p, t in zip(prompts, targets)]
                if tok.eos_token_id is not None:
                    rows = [r + [tok.eos_token_id] for r in rows]
                batch["labels"] = pad_rows([[-100] * len(pr) + r[len(pr):] for pr, r in zip(prompt_rows, rows)], -100)
        if targets is None and not model.config.text_config.is_encoder_decoder:
            # generation continues from the end of the prompt: pad on the left
            width = max(len(r) for r in rows)
            batch["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            batch["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        else:
            batch["input_ids"], batch["attention_mask"] = pad_rows(rows, pad), mask_rows(rows)
        if self.instructed:
            if procs.qformer_tokenizer is None:
                raise ValueError("InstructBLIP needs its Q-Former tokenizer (qformer_tokenizer/ beside the checkpoint); "
                                 "the language model's tokenizer gives the Q-Former wrong token ids")
            qtok = procs.qformer_tokenizer
            # cut as the language model's prompt is (LAVIS's instruct models tokenise the Q-Former's
            # text with the same max_txt_len)
            qrows = [token_ids(qtok, p, max_length=max_length) for p in prompts]
            batch["qformer_input_ids"] = pad_rows(qrows, qtok.pad_token_id or 0)
            batch["qformer_attention_mask"] = mask_rows(qrows)
        return batch

    def _qformer_masked(self, model: nn.Module, procs: Processors, batch: Batch) -> Batch:
        """InstructBLIP's calibration batch with QFORMER_MASK. The mask is matched to a Q-Former layer's
        input by shape, [batch, width] (the text FFN) or [batch, queries + width] (the self-attention):
        neither may be the shape of the query part's [batch, queries] or of the cross-attention's
        [batch, ViT tokens], so a width that would collide gets more padding columns."""
        if not self.instructed:
            return batch
        ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
        q = model.config.num_query_tokens
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        ids, mask = widen_clear_of(ids, mask, {q, tokens, tokens - q}, procs.qformer_tokenizer.pad_token_id or 0)
        # its own storage: the calibration file (safetensors) refuses shared tensors
        return dict(batch, qformer_input_ids=ids, qformer_attention_mask=mask, **{QFORMER_MASK: mask.clone()})

    def model_inputs(self, batch: Batch) -> Batch:
        """The batch without the entries that only mark padding for the statistics."""
        if not self.instructed:
            return batch
        if QFORMER_MASK not in batch:  # without it the instruction's padding would enter the Q-Former's statistics
            raise ValueError(f"the calibration batch has no {QFORMER_MASK!r}: the calibration file predates it; delete "
                             "results/<model>/calibration.safetensors and rerun calibration")
        return {k: v for k, v in batch.items() if k != QFORMER_MASK}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return at_least_fp32(model(**self.model_inputs(batch)).loss)

    def calibration_batch(self, model, procs, images, captions, prompt):
        return self._qformer_masked(model, procs, self._encode(model, procs, images, [prompt] * len(captions), captions))

    def prefix_calibration_batch(self, model: nn.Module, procs: Processors, images: list, prefixes: list[str],
                                 continuations: list[str], max_length: int = 32) -> Batch:
        """ECoFLaP's calibration loss (its LAVIS Blip2T5.forward on prefix CC3M): the image
        queries and the caption's prefix feed the encoder, the rest of the caption is the
        target, each tokenised with truncation to `max_length` (LAVIS's max_txt_len, 32). A
        decoder-only language model reads prefix + continuation and learns the continuation."""
        return self._qformer_masked(model, procs, self._encode(model, procs, images, prefixes, continuations,
                                                               max_length=max_length, joiner=""))

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
