"""The embedded vision-language model: a small CLIP trained here, from scratch and seeded,
on the vendored Fashion-MNIST subset (6,000 real product photos with template captions).
No pretrained vision-language weights can be had offline, so this is what lets the
vision-language path produce real quality numbers on a CPU machine: zero-shot
classification of the 1,000 held-out test photos from text prompts alone."""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from ecoflap.data import fashion_mnist as fm
from ecoflap.models.embedded_training import train_epochs
from ecoflap.models.processors import Processors

log = logging.getLogger(__name__)
SPECIAL = ["[PAD]", "[BOS]", "[UNK]", "[EOS]"]


def build_tokenizer() -> Any:
    """A word-level tokenizer over the caption vocabulary: [BOS] words [EOS]."""
    words = sorted({w for t in fm.TEMPLATES for c in fm.CLASSES for w in t.format(c).replace(".", " .").split()})
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                      special_tokens=[("[BOS]", 1), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", unk_token="[UNK]",
                                   eos_token="[EOS]", model_max_length=16)


def build_model(vocab_size: int) -> Any:
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=3)
    vision = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4, image_size=28,
                  patch_size=4, num_channels=3)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def image_processor() -> Any:
    # Fashion-MNIST photos are 28x28 grey on black; normalise with the training set's statistics
    return CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                              image_mean=[0.286] * 3, image_std=[0.353] * 3)


def train_fashion_clip(out_dir: Path, seed: int = 0, epochs: int = 10, batch_size: int = 128,
                       lr: float = 2e-3) -> dict[str, Any]:
    """Contrastive training with class-aware targets (captions of the same class are
    positives, so repeated captions in a batch are not pushed apart); returns its record."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok, pix = build_tokenizer(), image_processor()
    procs = Processors(tok, pix)
    model = build_model(len(tok)).train()
    images, labels = fm.load_split("train")
    pixels = procs.pixels([fm.to_image(a) for a in images])
    labels_t = torch.as_tensor(labels.astype("int64"))

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        y = labels_t[idx]
        text = tok([fm.caption(int(c), rng) for c in y], padding=True, return_tensors="pt")
        img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels[idx]).pooler_output), dim=-1)
        txt = F.normalize(model.text_projection(model.text_model(input_ids=text.input_ids,
                                                                 attention_mask=text.attention_mask).pooler_output), dim=-1)
        logits = img @ txt.t() * model.logit_scale.exp()
        same = (y[:, None] == y[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        return -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean()

    def clamp_temperature() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    final = train_epochs(model, len(labels), epochs, batch_size, lr, "training the embedded fashion CLIP", loss_of,
                         clamp_temperature)
    model.eval()
    model.save_pretrained(out_dir)
    procs.save_pretrained(out_dir)
    return {"source": "embedded", "name": "fashion-clip", "trained": {"seed": seed, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "train_images": len(labels), "final_loss": round(final, 4)},
            "note": "CLIP trained from scratch on the vendored Fashion-MNIST subset (MIT)"}
