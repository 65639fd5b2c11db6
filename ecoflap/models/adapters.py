"""One adapter per model family: which modules are the prunable blocks, and how a block's
outputs become a calibration loss. Scoring, allocation and pruning only talk to this
interface; they never look at model names.

To add a decoder-only family, register a `DecoderAdapter` with its attribute paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 for bf16/fp16 models; float64 models (tests) keep their precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _get(obj: object, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


@dataclass(frozen=True)
class DecoderAdapter:
    """A causal LM: embeddings -> `blocks_path` blocks -> `final_norm_paths` -> `head_path`."""

    family: str
    blocks_path: str
    final_norm_paths: tuple[str, ...]
    head_path: str = "lm_head"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_get(model, self.blocks_path))

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def prunable_layers(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Every Linear inside a block, by its name relative to the block (as Wanda does)."""
        return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        for path in self.final_norm_paths:
            hidden = _get(model, path)(hidden)
        return _get(model, self.head_path)(hidden)

    def loss_from_hidden(self, model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the final hidden states (the calibration loss)."""
        logits = _at_least_fp32(self.head(model, hidden)[:, :-1])
        labels = input_ids[:, 1:].to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def loss(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The same loss from a full forward pass of the model."""
        logits = _at_least_fp32(model(input_ids=input_ids, use_cache=False).logits[:, :-1])
        labels = input_ids[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# model_type (from config.json) -> adapter. LLaMA-like families share one layout.
_ADAPTERS: dict[str, DecoderAdapter] = {
    "llama": DecoderAdapter("llama", "model.layers", ("model.norm",)),
    "mistral": DecoderAdapter("mistral", "model.layers", ("model.norm",)),
    "qwen2": DecoderAdapter("qwen2", "model.layers", ("model.norm",)),
    "qwen3": DecoderAdapter("qwen3", "model.layers", ("model.norm",)),
    "opt": DecoderAdapter("opt", "model.decoder.layers", ("model.decoder.final_layer_norm",)),
}


def adapter_for(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"no adapter for model_type {model_type!r}; supported: {', '.join(sorted(_ADAPTERS))}. "
            "Add one in ecoflap/models/adapters.py"
        )
    adapter = _ADAPTERS[model_type]
    if model_type == "opt" and getattr(model.model.decoder, "project_out", None) is not None:
        adapter = DecoderAdapter("opt", adapter.blocks_path,
                                 ("model.decoder.final_layer_norm", "model.decoder.project_out"))
    return adapter


def model_layout(model: nn.Module, adapter: DecoderAdapter) -> dict[str, dict[str, int]]:
    """{block name: {full layer name: weight count}} for every prunable layer, in model order."""
    layout: dict[str, dict[str, int]] = {}
    for i, block in enumerate(adapter.blocks(model)):
        prefix = adapter.block_name(i)
        layout[prefix] = {f"{prefix}.{n}": layer.weight.numel() for n, layer in adapter.prunable_layers(block).items()}
    return layout
