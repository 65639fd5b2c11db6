"""Which adapter a model gets: decoder and encoder-decoder LMs by config.json's model_type, vision-language
models by their transformers class (one BLIP checkpoint type serves several heads). This
module imports every family; nothing imports it back, so there is no cycle. A new family is
one module in `models/families/` plus its line here (and its capabilities in catalog.py)."""
from __future__ import annotations

from pathlib import Path

import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from ecoflap.models.base import Adapter
from ecoflap.models.families.blip2 import Blip2Adapter
from ecoflap.models.families.blip2_retrieval import Blip2RetrievalAdapter
from ecoflap.models.families.blip_caption import BlipCaptionAdapter
from ecoflap.models.families.blip_retrieval import BlipRetrievalAdapter
from ecoflap.models.families.blip_vqa import BlipVqaAdapter
from ecoflap.models.families.clip import ClipAdapter
from ecoflap.models.families.decoder import DECODERS, decoder_adapter
from ecoflap.models.families.eva_clip import EvaClipAdapter
from ecoflap.models.families.gemma3 import Gemma3Adapter
from ecoflap.models.families.idefics3 import Idefics3Adapter
from ecoflap.models.families.image_classifier import ImageClassifierAdapter
from ecoflap.models.families.internvl import InternVLAdapter
from ecoflap.models.families.llava import LlavaAdapter
from ecoflap.models.families.qwen_vl import QwenVLAdapter
from ecoflap.models.families.seq2seq import SEQ2SEQ
from ecoflap.models.vision_language import VisionLanguageAdapter

# transformers class -> adapter
VISION_LANGUAGE: dict[str, VisionLanguageAdapter] = {
    "Blip2ForConditionalGeneration": Blip2Adapter(),
    "InstructBlipForConditionalGeneration": Blip2Adapter(family="instructblip", instructed=True),
    "Blip2ForImageTextRetrieval": Blip2RetrievalAdapter(),
    "CLIPModel": ClipAdapter(),
    "BlipForConditionalGeneration": BlipCaptionAdapter(),
    "BlipForQuestionAnswering": BlipVqaAdapter(),
    "BlipForImageTextRetrieval": BlipRetrievalAdapter(),
    "ViTForImageClassification": ImageClassifierAdapter("vit"),
    "DeiTForImageClassification": ImageClassifierAdapter("deit"),
    "DeiTForImageClassificationWithTeacher": ImageClassifierAdapter("deit"),
    "CustomTextCLIP": EvaClipAdapter(),  # open_clip's class (models/open_clip_format.py builds it)
    # chat VLMs: the processor renders the chat template and expands the image tokens
    "LlavaForConditionalGeneration": LlavaAdapter(),
    "LlavaNextForConditionalGeneration": LlavaAdapter(),
    "LlavaOnevisionForConditionalGeneration": LlavaAdapter(),
    "Qwen2VLForConditionalGeneration": QwenVLAdapter(),
    "Qwen2_5_VLForConditionalGeneration": QwenVLAdapter(),
    "Qwen3VLForConditionalGeneration": QwenVLAdapter(deepstack=True),
    "Idefics3ForConditionalGeneration": Idefics3Adapter(),
    "SmolVLMForConditionalGeneration": Idefics3Adapter(),
    "Gemma3ForConditionalGeneration": Gemma3Adapter(),
    "InternVLForConditionalGeneration": InternVLAdapter(),
}


def adapter_for(model: nn.Module, family: str | None = None) -> Adapter:
    """The adapter of a loaded model. `family` (the config's) is checked against it: a
    config that calls a CLIP checkpoint causal_lm gets an error, not a wrong pipeline."""
    cls = type(model).__name__
    model_type = getattr(model.config, "model_type", None)
    if cls in VISION_LANGUAGE:
        adapter: Adapter = VISION_LANGUAGE[cls]
    elif model_type in DECODERS:
        adapter = decoder_adapter(model)
    elif model_type in SEQ2SEQ:
        adapter = SEQ2SEQ[model_type]
    else:
        raise ValueError(
            f"no adapter for {cls} (model_type {model_type!r}); supported: decoder LMs {', '.join(sorted(DECODERS))}, "
            f"encoder-decoder LMs {', '.join(sorted(SEQ2SEQ))} and {', '.join(sorted(VISION_LANGUAGE))}. "
            "A LLaMA-like decoder is one line in DECODERS "
            "(ecoflap/models/families/decoder.py); another family is a module in ecoflap/models/families/")
    if family is not None and family != adapter.family:
        raise ValueError(f"the config says family {family!r}, but this checkpoint is a {cls}, family "
                         f"{adapter.family!r}; set `family: {adapter.family}` for this model in config.yaml "
                         "(or point the model entry at the checkpoint you meant)")
    return adapter


def model_class(path: str | Path, trust_remote_code: bool = False) -> type:
    """The transformers class to load a checkpoint with: vision-language checkpoints by the
    architecture their config.json names (a BLIP checkpoint may be a captioner, a VQA model
    or a retriever), encoder-decoder LMs (T5) as seq2seq LMs, everything else as a causal LM."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for arch in getattr(config, "architectures", None) or []:
        if arch in VISION_LANGUAGE:
            return getattr(transformers, arch)
    if getattr(config, "model_type", None) in SEQ2SEQ:
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM
