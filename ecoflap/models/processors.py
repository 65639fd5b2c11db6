"""What turns images and text into model inputs: a tokenizer for language models;
tokenizer + image processor (+ InstructBLIP's Q-Former tokenizer) for vision-language
models. Saved beside every checkpoint and loaded back with it."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from ecoflap.models.open_clip_format import is_open_clip_folder, load_open_clip_processors


@dataclass
class Processors:
    """What turns images and text into model inputs (saved beside the checkpoint)."""

    tokenizer: Any
    image_processor: Any = None
    qformer_tokenizer: Any = None  # InstructBLIP tokenises the instruction twice
    multimodal: Any = None  # chat VLMs (LLaVA, Qwen-VL, ...): the processor that expands image tokens

    def pixels(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt").pixel_values

    def save_pretrained(self, out: Any) -> None:
        if self.multimodal is not None:  # tokenizer, image processor, chat template and its own settings
            self.multimodal.save_pretrained(out)
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out)
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(Path(out) / "qformer_tokenizer")



# Chat vision-language models whose processor expands each image into its image tokens
# (models/families/llava.py, qwen_vl.py, idefics3.py, gemma3.py, internvl.py)
CHAT_VLM_ARCHITECTURES = (
    "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
    "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration", "Gemma3ForConditionalGeneration",
    "InternVLForConditionalGeneration",
)


def _architecture(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    architectures = json.loads(config.read_text()).get("architectures") or [None]
    return architectures[0]


def without_video(cls: type) -> type:
    """The processor class without its video processor. Several chat VLM processors take one
    (Qwen-VL, InternVL, SmolVLM, LLaVA-OneVision), and transformers' video processors need
    torchvision, which the core environment lacks; images never use it. transformers reads a
    processor's attributes off its __init__ signature, and the settings it restores from
    processor_config.json (image_seq_length, ...) off its code object, so the subclass gets an
    __init__ with the parent's parameters less video_processor (written out, hence the exec)."""
    parent = inspect.signature(cls.__init__)
    if "video_processor" not in parent.parameters:
        return cls
    kept = [p for p in parent.parameters.values() if p.name not in ("self", "video_processor")
            and p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {f"_default_{p.name}": p.default for p in kept}
    params = ", ".join(f"{p.name}=_default_{p.name}" if p.default is not p.empty else p.name for p in kept)
    passed = ", ".join(f"{p.name}={p.name}" for p in kept)
    namespace = {"_parent": cls.__init__, **defaults}
    exec(f"def __init__(self, {params}, **kwargs):\n"
         f"    _parent(self, {passed}, video_processor=None, **kwargs)\n", namespace)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLM's own override reads video settings; rendering a text conversation needs none
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": namespace["__init__"], "apply_chat_template": apply_chat_template,
                                       "__module__": cls.__module__})


def load_chat_processor(path: Path, trust_remote_code: bool = False) -> Any:
    """A chat VLM's processor (tokenizer, PIL image processor, chat template), without video."""
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"{path}: transformers names no processor for model_type {model_type!r}")
    cls = getattr(transformers, name)
    return without_video(cls).from_pretrained(path, trust_remote_code=trust_remote_code)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "vocab.txt", "spiece.model")


def load_processors(path: Path, trust_remote_code: bool = False) -> Any:
    """A text tokenizer for LMs; `Processors` for vision-language checkpoints (those with a
    preprocessor_config.json). PIL image processors only: the fast ones need torchvision,
    which the core environment does not have."""
    path = Path(path)
    if is_open_clip_folder(path):
        return load_open_clip_processors(path)
    if _architecture(path) in CHAT_VLM_ARCHITECTURES:
        multimodal = load_chat_processor(path, trust_remote_code)
        return Processors(multimodal.tokenizer, multimodal.image_processor, multimodal=multimodal)
    if not (path / "preprocessor_config.json").exists():
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # an image classifier (ViT, DeiT) ships an image processor and no tokenizer
    has_tokenizer = any((path / f).exists() for f in TOKENIZER_FILES)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code) if has_tokenizer else None
    image = AutoImageProcessor.from_pretrained(path, backend="pil")
    qtok = AutoTokenizer.from_pretrained(path / "qformer_tokenizer") if (path / "qformer_tokenizer").is_dir() else None
    return Processors(tok, image, qtok)
