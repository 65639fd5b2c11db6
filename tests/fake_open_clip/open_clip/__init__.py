"""A test double of the part of open_clip's API the pipeline calls (add_model_config,
create_model, get_tokenizer, image_transform), for the core environment, where the real
open_clip cannot be imported (it needs torchvision). Only tests put it on the path.

The model it builds has the module tree and parameter names of open_clip's EVA01-g-14 vision
side (a timm Eva trunk at visual.trunk: patch_embed.proj, cls_token, pos_embed, blocks of
norm1 / attn.{qkv, q_bias, k_bias, v_bias, proj} / norm2 / mlp.{fc1, fc2}, norm, head), at toy
sizes, including timm's quirk that the attention adds its q/v biases through
F.linear(x, qkv.weight, bias) unless `qkv_bias_separate` is set. Its text tower is a small
stand-in (the family never prunes it); the tokenizer hashes words. What it proves is our
plumbing: folder conversion, layout, hooks, loading, saving and the workflow."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

_CONFIGS: dict[str, dict] = {}


def add_model_config(path):
    path = Path(path)
    for f in ([path] if path.is_file() else sorted(path.glob("*.json"))):
        _CONFIGS[f.stem] = json.loads(f.read_text())


class EvaAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.proj = nn.Linear(dim, dim)
        self.qkv_bias_separate = False

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), EvaAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Eva(nn.Module):
    def __init__(self, image_size, patch, dim, depth, heads, hidden, out_dim):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(EvaBlock(dim, heads, hidden) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class TimmModel(nn.Module):
    def __init__(self, cfg, embed_dim):
        super().__init__()
        self.image_size = (cfg["image_size"], cfg["image_size"])
        self.trunk = Eva(cfg["image_size"], cfg["patch_size"], cfg["width"], cfg["layers"], cfg["heads"],
                         cfg["mlp_hidden"], embed_dim)

    def forward(self, x):
        return self.trunk(x)


class TextTower(nn.Module):
    def __init__(self, cfg, embed_dim):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg["vocab_size"], cfg["width"])
        self.ln_final = nn.LayerNorm(cfg["width"])
        self.text_projection = nn.Linear(cfg["width"], embed_dim, bias=False)

    def forward(self, tokens):
        mask = (tokens != 0).unsqueeze(-1).float()
        pooled = (self.token_embedding(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.text_projection(self.ln_final(pooled))


class CustomTextCLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.visual = TimmModel(cfg["vision_cfg"], cfg["embed_dim"])
        self.text = TextTower(cfg["text_cfg"], cfg["embed_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def encode_image(self, image, normalize=False):
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=False):
        x = self.text(text)
        return F.normalize(x, dim=-1) if normalize else x


def create_model(model_name, pretrained=None, device="cpu", **kwargs):
    if pretrained is not None:
        raise ValueError("the test double loads no pretrained weights")
    model = CustomTextCLIP(_CONFIGS[model_name])
    if torch.device(device).type != "meta" and any(p.is_meta for p in model.parameters()):
        raise NotImplementedError("Cannot copy out of meta tensor (as open_clip's create_model moves the model)")
    return model.to(device)


class _HashTokenizer:
    def __init__(self, context, vocab):
        self.context, self.vocab = context, vocab

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [1 + sum(map(ord, w)) * 31 % (self.vocab - 1) for w in text.lower().split()][: self.context]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def get_tokenizer(model_name, **kwargs):
    text = _CONFIGS[model_name]["text_cfg"]
    return _HashTokenizer(text["context_length"], text["vocab_size"])


def image_transform(image_size, is_train, mean=None, std=None, resize_mode=None, interpolation=None, **kwargs):
    size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    mean = torch.tensor(mean or (0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor(std or (0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)

    def transform(image):
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - mean) / std

    return transform
