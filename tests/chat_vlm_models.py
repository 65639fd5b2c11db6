"""Tiny randomly initialised chat vision-language models built in code, saved with their
processors (no network): LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM,
Gemma 3 and InternVL. Two blocks per tower, widths 32 / 64, a byte-level BPE tokenizer with
each family's image tokens, and a plain chat template (USER: <image>question / ASSISTANT:)."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILY_OF = {"llava": "llava", "llava_next": "llava", "llava_onevision": "llava", "qwen2_vl": "qwen_vl", "qwen2_5_vl": "qwen_vl",
             "qwen3_vl": "qwen_vl",
             "idefics3": "idefics3", "smolvlm": "idefics3", "gemma3": "gemma3", "internvl": "internvl"}
KINDS = tuple(FAMILY_OF)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + \
    [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


def _tokenizer(named=None, unnamed=()):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from ecoflap.data.corpora import embedded_text

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([embedded_text("austen-emma")[:60_000]], vocab_size=400, min_frequency=2,
                            special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  extra_special_tokens=dict(named or {}))
    if unnamed:
        tok.add_special_tokens({"additional_special_tokens": list(unnamed)}, replace_extra_special_tokens=False)
    return tok


def _template(placeholder: str) -> str:
    """USER: <placeholder>question / ASSISTANT: answer</s>; the generation prompt is 'ASSISTANT:'."""
    return ("{%- for message in messages -%}{{- message['role'] | upper + ': ' -}}"
            "{%- for c in message['content'] -%}"
            "{%- if c['type'] == 'image' -%}{{- " + repr(placeholder) + " -}}"
            "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}"
            "{%- if message['role'] == 'assistant' -%}</s>{%- endif -%}{{- '\\n' -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")


def _lm(tok, **extra):
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **TEXT, **extra)


def build(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers as T

    from ecoflap.models.processors import without_video

    torch.manual_seed(seed)
    if kind in ("llava", "llava_next"):
        tok = _tokenizer({"image_token": "<image>"})
        vision = T.CLIPVisionConfig(**VISION, projection_dim=32)
        common = dict(image_token_index=tok.image_token_id, image_seq_length=16,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
        kwargs = dict(tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1, chat_template=_template("<image>\n"))
        if kind == "llava":
            ip = T.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            proc = T.LlavaProcessor(image_processor=ip, **kwargs)
            model = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision,
                                                                  text_config=T.LlamaConfig(**_lm(tok)), **common))
        else:
            pins = [[32, 64], [64, 32], [64, 64]]
            ip = T.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pins)
            proc = T.LlavaNextProcessor(image_processor=ip, **kwargs)
            model = T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(
                vision_config=vision, text_config=T.LlamaConfig(**_lm(tok)), image_grid_pinpoints=pins, **common))
    elif kind == "llava_onevision":  # SigLIP tower (all patches, no CLS) + Qwen2
        tok = _tokenizer({"image_token": "<image>", "video_token": "<video>"})
        pins = [[32, 32], [32, 64], [64, 32], [64, 64]]
        ip = T.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pins)
        proc = without_video(T.LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=_template("<image>\n"))
        model = T.LlavaOnevisionForConditionalGeneration(T.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **VISION),
            text_config=dict(model_type="qwen2", **_lm(tok)), image_token_index=tok.image_token_id,
            video_token_index=tok.video_token_id, image_grid_pinpoints=pins, vision_feature_select_strategy="full",
            vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9"))
    elif kind in ("qwen2_vl", "qwen2_5_vl"):
        tok = _tokenizer(QWEN_TOKENS)
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in QWEN_TOKENS.items()}
        ip = T.Qwen2VLImageProcessorPil(patch_size=7, temporal_patch_size=2, merge_size=2,
                                        size={"shortest_edge": 784, "longest_edge": 4096})
        text = _lm(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        tokens = dict(image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                      vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])
        cls, config = (T.Qwen2VLProcessor, T.Qwen2VLConfig) if kind == "qwen2_vl" else \
            (T.Qwen2_5_VLProcessor, T.Qwen2_5_VLConfig)
        proc = without_video(cls)(image_processor=ip, tokenizer=tok,
                                  chat_template=_template("<|vision_start|><|image_pad|><|vision_end|>"))
        if kind == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=7,
                          spatial_merge_size=2, temporal_patch_size=2)
            model = T.Qwen2VLForConditionalGeneration(config(vision_config=vision, text_config=text, **tokens))
        else:  # windowed attention in block 0, full attention in block 1
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=7,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=28, out_hidden_size=64,
                          fullatt_block_indexes=[1])
            model = T.Qwen2_5_VLForConditionalGeneration(config(vision_config=vision, text_config=text, **tokens))
    elif kind == "qwen3_vl":  # DeepStack: vision blocks 0 and 1 feed language layers 0 and 1 (of 3)
        tok = _tokenizer(QWEN_TOKENS)
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in QWEN_TOKENS.items()}
        ip = T.Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                        size={"shortest_edge": 1024, "longest_edge": 4096})
        text = dict(model_type="qwen3_vl_text", head_dim=16, **{**_lm(tok), "num_hidden_layers": 3},
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                     "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1])
        proc = without_video(T.Qwen3VLProcessor)(image_processor=ip, tokenizer=tok,
                                                 chat_template=_template("<|vision_start|><|image_pad|><|vision_end|>"))
        model = T.Qwen3VLForConditionalGeneration(T.Qwen3VLConfig(
            vision_config=vision, text_config=text, image_token_id=ids["image_token"],
            video_token_id=ids["video_token"], vision_start_token_id=ids["vision_start_token"],
            vision_end_token_id=ids["vision_end_token"]))
    elif kind in ("idefics3", "smolvlm"):
        tok = _tokenizer(unnamed=IDEFICS_TOKENS)
        text = dict(model_type="llama", **_lm(tok))
        config = dict(vision_config=dict(VISION), text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      scale_factor=2)
        if kind == "idefics3":
            ip = T.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
            proc = T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                       chat_template=_template("<image>"))
            model = T.Idefics3ForConditionalGeneration(T.Idefics3Config(**config))
        else:
            ip = T.SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
            proc = without_video(T.SmolVLMProcessor)(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                                     chat_template=_template("<image>"))
            model = T.SmolVLMForConditionalGeneration(T.SmolVLMConfig(**config))
    elif kind == "gemma3":
        tok = _tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                          "image_token": "<image_soft_token>"})
        ip = T.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                 chat_template=_template("<start_of_image>"))
        text = T.Gemma3TextConfig(**_lm(tok, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"]))
        model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(
            vision_config=T.SiglipVisionConfig(**VISION, vision_use_head=False), text_config=text,
            mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
            image_token_index=tok.image_token_id))
        with torch.no_grad():  # initialised at zero: the image would reach the language model as zeros
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    elif kind == "internvl":
        tok = _tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
        ip = T.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                        max_patches=4)
        proc = without_video(T.InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                                  chat_template=_template("<IMG_CONTEXT>\n"))
        model = T.InternVLForConditionalGeneration(T.InternVLConfig(
            vision_config=dict(VISION), text_config=dict(model_type="qwen2", **_lm(tok)),
            image_token_id=tok.context_image_token_id, image_seq_length=4, downsample_ratio=0.5,
            vision_feature_layer=-1))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # blocks of different scales, so that scores and allocations differ
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() == 2 and (".layers." in name or ".layer." in name or ".blocks." in name):
                p.mul_(0.5 + torch.rand(1, generator=g).item())
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def render_and_add_bos(proc) -> None:
    """As Gemma 3 ships: the tokenizer adds BOS to every encoded text (add_bos_token) and the chat
    template starts with {{ bos_token }} too, so encoding rendered text with special tokens doubles it."""
    from tokenizers.processors import TemplateProcessing

    tok = proc.tokenizer
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    proc.chat_template = "{{- bos_token -}}" + proc.chat_template
