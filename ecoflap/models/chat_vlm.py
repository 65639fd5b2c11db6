"""What the chat vision-language families share (LLaVA, Qwen-VL, Idefics3 / SmolVLM, Gemma 3,
InternVL; one module each in models/families/): the model's own processor renders a
conversation through the checkpoint's chat template and expands each image into its image
tokens, so the adapters never count image tokens themselves.

* Calibration: one image-caption pair is a user turn (the image, then the instruction) and an
  assistant turn (the caption). The loss counts the assistant turn only: the image tokens, the
  instruction and the template's own tokens are -100, and so is padding (right padding). The
  language model's statistics leave padding out (mask_key attention_mask).
* VQA and captioning: the user turn alone with the generation prompt, left padding, greedy
  decoding; the answer is what follows the prompt.
* Several processors return tensors without a per-example dimension (Qwen-VL's flattened
  patches, InternVL's tiles). The calibration file and the engine's batches slice every tensor
  along its first dimension, so those tensors are stored per example, padded to the longest
  (`pack`), with each example's row count, and put back together before the model sees them
  (`model_inputs`).
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from ecoflap.models.base import Batch, Stack, at_least_fp32
from ecoflap.models.processors import Processors
from ecoflap.models.vision_language import VisionLanguageAdapter

# The short-answer instruction LLaVA-1.5 evaluates VQAv2 / GQA / TextVQA with, which the later
# families report with too
SHORT_ANSWER = "Answer the question using a single word or phrase."
# the instruction when calibration.prompt (or a captioning entry's prompt) is empty
CALIBRATION_INSTRUCTION = "Give a short caption of this image."
# new-token budgets when the entry sets no max_new_tokens: a short answer, or a whole caption (a
# one-sentence caption is 10-20 tokens; 10 would cut it mid-sentence). Generation stops at EOS first
VQA_MAX_NEW_TOKENS = 10
CAPTION_MAX_NEW_TOKENS = 64
ROWS = "_rows"  # suffix of the per-example row counts that `pack` stores


def user_turn(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def conversation(text: str, answer: str) -> list[dict[str, Any]]:
    return user_turn(text) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def template_has_bos(tokenizer, texts: list[str]) -> bool:
    """Whether the chat template rendered the BOS itself (Gemma 3's starts with {{ bos_token }}).
    Such text is encoded without the tokenizer's special tokens, else a tokenizer that adds BOS
    gives two; transformers' apply_chat_template(tokenize=True) decides the same way."""
    bos = tokenizer.bos_token
    return bool(bos) and all(t.startswith(bos) for t in texts)


def encode(proc, images: list, texts: list[str], padding_side: str) -> dict[str, torch.Tensor]:
    """The processor on rendered chat texts, adding special tokens only where the template did not."""
    return proc(images=images, text=texts, padding=True, padding_side=padding_side, return_tensors="pt",
                add_special_tokens=not template_has_bos(proc.tokenizer, texts))


class ChatVLMAdapter(VisionLanguageAdapter):
    """Subclasses set `family`, `vision_path`, `language_path`, and, where the processor
    returns a tensor without a per-example dimension, `rows_per_example`."""

    vision_path: str
    language_path: str
    nested_images: bool = False  # the processor wants one list of images per example
    # calibration images larger than this many pixels are scaled down first (0: never); for the
    # native-resolution families, whose stored patches would otherwise grow with the image
    calibration_max_pixels: int = 0
    vqa_prompt: str = "{}\n" + SHORT_ANSWER
    caption_max_new_tokens = CAPTION_MAX_NEW_TOKENS  # the evaluation's captions, with or without a prompt

    def stacks(self, model: nn.Module) -> list[Stack]:
        # the projector (or merger) between the two stays dense, as the published settings leave it.
        # Blocks get arguments of their own: Qwen2.5-VL's windowed vision blocks other segment bounds
        # than its full-attention ones, Gemma 3's sliding-window layers other masks and rotary tables
        return [Stack("vision", self.vision_path, "vision", per_block_inputs=True),
                Stack("language", self.language_path, "language", per_block_inputs=True, mask_key="attention_mask")]

    # -- tensors without a per-example dimension ------------------------------------------------
    def rows_per_example(self, model: nn.Module, encoded: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """{key: rows of that tensor belonging to each example, in order}; none by default."""
        return {}

    def pack(self, model: nn.Module, encoded: dict[str, torch.Tensor]) -> Batch:
        batch = dict(encoded)
        for key, rows in self.rows_per_example(model, encoded).items():
            parts = torch.split(encoded[key], rows)
            width = max(rows)
            batch[key] = torch.stack([torch.cat([p, p.new_zeros((width - len(p), *p.shape[1:]))]) for p in parts])
            batch[key + ROWS] = torch.tensor(rows)
        return batch

    def model_inputs(self, batch: Batch) -> Batch:
        out = {k: v for k, v in batch.items() if not k.endswith(ROWS)}
        for key in [k[: -len(ROWS)] for k in batch if k.endswith(ROWS)]:
            rows = batch[key + ROWS].tolist()
            out[key] = torch.cat([batch[key][i, :n] for i, n in enumerate(rows)])
        return out

    # -- calibration ------------------------------------------------------------------------------
    def _images(self, images: list) -> list:
        return [[im] for im in images] if self.nested_images else list(images)

    def _image_token_id(self, model: nn.Module) -> int:
        config = model.config
        return getattr(config, "image_token_id", None) or getattr(config, "image_token_index")

    def _bounded(self, images: list) -> list:
        if not self.calibration_max_pixels:
            return list(images)
        out = []
        for im in images:
            scale = (self.calibration_max_pixels / (im.width * im.height)) ** 0.5
            out.append(im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.BICUBIC)
                       if scale < 1 else im)
        return out

    def calibration_batch(self, model: nn.Module, procs: Processors, images: list, captions: list[str],
                          prompt: str) -> Batch:
        proc = procs.multimodal
        images = self._bounded(images)
        instruction = prompt or CALIBRATION_INSTRUCTION
        asked = proc.apply_chat_template(user_turn(instruction), add_generation_prompt=True, tokenize=False)
        fulls = [proc.apply_chat_template(conversation(instruction, c), tokenize=False) for c in captions]
        if not all(f.startswith(asked) for f in fulls):
            raise ValueError(f"{self.family}: the chat template's generation prompt {asked[-60:]!r} is not a prefix of "
                             "the rendered conversation, so the caption tokens cannot be told apart")
        enc = encode(proc, self._images(images), fulls, "right")
        # the prompt alone, through the processor too: where the caption starts after image-token expansion
        alone = encode(proc, self._images(images), [asked] * len(captions), "right")
        prompt_lengths = alone["attention_mask"].sum(1)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, n in enumerate(prompt_lengths.tolist()):
            if not torch.equal(enc["input_ids"][i, :n], alone["input_ids"][i, :n]):
                raise ValueError(f"{self.family}: the processed prompt is not a prefix of the processed conversation")
            labels[i, :n] = -100
        if (labels == self._image_token_id(model)).any():
            raise ValueError(f"{self.family}: image tokens left in the calibration targets")
        batch = self.pack(model, dict(enc))
        batch["labels"] = labels
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return at_least_fp32(model(**self.model_inputs(batch)).loss)

    def forward(self, model: nn.Module, batch: Batch) -> None:
        model(**self.model_inputs(batch))

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: nn.Module, procs: Processors, images: list, prompts: list[str],
                 gen_kwargs: dict[str, Any]) -> list[str]:
        """Greedy answers (unless the entry asks for beams) to `prompts`, one image each, the batch
        left-padded so that every answer starts right after its own prompt. Without max_new_tokens in
        `gen_kwargs`: at most VQA_MAX_NEW_TOKENS, or CAPTION_MAX_NEW_TOKENS where no prompt is given
        (a caption; the evaluation's captioning passes caption_max_new_tokens itself, prompt or not)."""
        proc = procs.multimodal
        # captioning passes no prompt: the chat models are asked for a caption in words
        texts = [proc.apply_chat_template(user_turn(p or CALIBRATION_INSTRUCTION), add_generation_prompt=True,
                                          tokenize=False) for p in prompts]
        enc = encode(proc, self._images(images), texts, "left")
        device = next(model.parameters()).device
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        enc = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in enc.items()}
        # no prompt is a caption request (the evaluation's captioning entries without a prompt of their own):
        # its budget must hold a sentence, else the caption is cut mid-sentence and scored so
        budget = VQA_MAX_NEW_TOKENS if any(prompts) else CAPTION_MAX_NEW_TOKENS
        settings = {"do_sample": False, "max_new_tokens": budget, **gen_kwargs}
        out = model.generate(**enc, **settings, pad_token_id=proc.tokenizer.pad_token_id)
        answers = proc.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [a.strip() for a in answers]


__all__ = ["CALIBRATION_INSTRUCTION", "CAPTION_MAX_NEW_TOKENS", "ChatVLMAdapter", "SHORT_ANSWER", "VQA_MAX_NEW_TOKENS",
           "conversation", "encode", "template_has_bos", "user_turn"]
