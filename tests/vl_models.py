"""Tiny randomly initialised vision-language models built in code, saved with processors
(no network): BLIP-2 with OPT and with T5, InstructBLIP with a LLaMA-family LM, BLIP-2's
Q-Former retriever, CLIP, and BLIP's captioner, VQA model and retriever. 32x32 images,
2 blocks per stack."""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE = 32
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE,
              patch_size=8, initializer_range=0.3)


def _tokenizer():
    from conftest import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _qformer(vocab: int, text_input: bool = False) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                encoder_hidden_size=32, vocab_size=vocab, cross_attention_frequency=1,
                use_qformer_text_input=text_input, initializer_range=0.3)


def _spread(model, seed: int) -> None:
    """Random init makes blocks alike; scale each block differently so scores differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name or ".layer." in name or ".block." in name:
                p.mul_(0.5 + torch.rand(1, generator=g).item() * 1.5)


def build(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers as T

    torch.manual_seed(seed)
    tok = _tokenizer()
    vocab = len(tok)
    image_token = tok.convert_tokens_to_ids("<image>")
    blip_pix = T.BlipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    if kind in ("blip2_opt", "blip2_t5", "instructblip", "blip2_retrieval"):
        if kind == "blip2_t5":
            text = T.T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                              num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                              pad_token_id=0, eos_token_id=2).to_dict()
        elif kind == "instructblip":
            text = T.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0).to_dict()
        else:
            text = T.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                               num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2).to_dict()
        if kind == "instructblip":
            cfg = T.InstructBlipConfig(vision_config=VISION, qformer_config=_qformer(vocab), text_config=text,
                                       num_query_tokens=4, image_token_index=image_token)
            model = T.InstructBlipForConditionalGeneration(cfg)
        elif kind == "blip2_retrieval":
            cfg = T.Blip2Config(vision_config=VISION, qformer_config=_qformer(vocab, True), text_config=text,
                                num_query_tokens=4, image_token_index=None, image_text_hidden_size=16)
            model = T.Blip2ForImageTextRetrieval(cfg)
        else:
            cfg = T.Blip2Config(vision_config=VISION, qformer_config=_qformer(vocab), text_config=text,
                                num_query_tokens=4, image_token_index=image_token)
            model = T.Blip2ForConditionalGeneration(cfg)
        pix = blip_pix
    elif kind == "clip":
        cfg = T.CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                            eos_token_id=2, pad_token_id=0, bos_token_id=1),
                           vision_config=VISION, projection_dim=16)
        model = T.CLIPModel(cfg)
        pix = T.CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    elif kind in ("blip_caption", "blip_vqa", "blip_retrieval"):
        cfg = T.BlipConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=32,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0, sep_token_id=2),
                           vision_config=VISION, projection_dim=16, image_text_hidden_size=16)
        cls = {"blip_caption": T.BlipForConditionalGeneration, "blip_vqa": T.BlipForQuestionAnswering,
               "blip_retrieval": T.BlipForImageTextRetrieval}[kind]
        model = cls(cfg)
        pix = blip_pix
    else:
        raise ValueError(kind)
    _spread(model, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    pix.save_pretrained(out)
    if kind == "instructblip":
        tok.save_pretrained(out / "qformer_tokenizer")
    return out
