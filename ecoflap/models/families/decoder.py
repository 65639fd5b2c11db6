"""Decoder-only language models (LLaMA, Mistral, Qwen2/3, OPT): embeddings -> one stack of
decoder blocks -> final norm -> LM head. Config family `causal_lm`; a LLaMA-like
architecture is one line in DECODERS (keyed by config.json's model_type)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ecoflap.models.base import Adapter, Batch, Stack, at_least_fp32, get_module


@dataclass(frozen=True)
class DecoderAdapter(Adapter):
    """A causal LM: embeddings -> `blocks_path` blocks -> `final_norm_paths` -> `head_path`."""

    architecture: str  # config.json's model_type
    blocks_path: str
    final_norm_paths: tuple[str, ...]
    head_path: str = "lm_head"
    family: str = "causal_lm"

    def stacks(self, model: nn.Module) -> list[Stack]:
        return [Stack("language", self.blocks_path, "language")]

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        for path in self.final_norm_paths:
            hidden = get_module(model, path)(hidden)
        return get_module(model, self.head_path)(hidden)

    def loss_from_hidden(self, model: nn.Module, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Next-token cross-entropy of the final hidden states (the calibration loss)."""
        logits = at_least_fp32(self.head(model, hidden)[:, :-1])
        labels = batch["input_ids"][:, 1:].to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = at_least_fp32(model(input_ids=ids, use_cache=False).logits[:, :-1])
        labels = ids[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# model_type (from config.json) -> adapter. LLaMA-like families share one layout.
DECODERS: dict[str, DecoderAdapter] = {
    "llama": DecoderAdapter("llama", "model.layers", ("model.norm",)),
    "mistral": DecoderAdapter("mistral", "model.layers", ("model.norm",)),
    "qwen2": DecoderAdapter("qwen2", "model.layers", ("model.norm",)),
    "qwen3": DecoderAdapter("qwen3", "model.layers", ("model.norm",)),
    "opt": DecoderAdapter("opt", "model.decoder.layers", ("model.decoder.final_layer_norm",)),
}


def decoder_adapter(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(model.config, "model_type", None)
    adapter = DECODERS[model_type]
    if model_type == "opt" and getattr(model.model.decoder, "project_out", None) is not None:
        adapter = DecoderAdapter("opt", adapter.blocks_path,
                                 ("model.decoder.final_layer_norm", "model.decoder.project_out"))
    return adapter
