"""One adapter per model family: which modules are the prunable blocks, grouped in stacks
that data flows through in order, and how a calibration batch becomes a loss. Scoring,
allocation and pruning only talk to this interface; they never look at model names.

A *stack* is a sequence of blocks that pass hidden states from one to the next (a vision
encoder, a Q-Former, a language model's decoder). A decoder-only LM has one stack; BLIP-2
with FlanT5 has four (vision, Q-Former, T5 encoder, T5 decoder). Each stack belongs to a
*sub-model* ("vision", "qformer", "language"), the unit of the per-sub-model budget.

Decoder-only families live here; vision-language families in `vision_language.py`.
Calibration batches are dicts of tensors, passed to the model as keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ecoflap.models.families import FAMILIES

Batch = dict[str, torch.Tensor]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 for bf16/fp16 models; float64 models (tests) keep their precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def get_module(obj: object, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def batch_to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class Stack:
    """Blocks at `path` (a ModuleList) that hand hidden states to each other.

    per_block_inputs: the model passes each block different extra arguments (T5 hands the
    relative position bias computed by block 0 to the later blocks), so the capture must
    record every block's arguments instead of reusing block 0's.
    calls: how many times one forward pass runs the stack (BLIP-2's retrieval model runs
    its Q-Former once on the image queries and once on the text); each run is calibration
    data of its own.
    mask_key: the batch entry marking the stack's real (non-padding) positions, so padding
    does not enter the pruners' activation statistics ("labels": those not -100).
    """

    name: str
    path: str
    submodel: str
    per_block_inputs: bool = False
    calls: int = 1
    mask_key: str | None = None


class Adapter:
    """Base: subclasses set `family` and `tasks`, and implement `stacks` and `loss`."""

    family: str
    tasks: tuple[str, ...]

    def stacks(self, model: nn.Module) -> list[Stack]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The calibration loss from a full forward pass."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch) -> None:
        """Run the model on a calibration batch (block hooks record what flows through)."""
        self.loss(model, batch)

    # -- derived from stacks ----------------------------------------------------------------
    def stack_blocks(self, model: nn.Module, stack: Stack) -> list[nn.Module]:
        return list(get_module(model, stack.path))

    def named_blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every block of every stack, in data-flow order, by its module path."""
        return [(f"{s.path}.{j}", block) for s in self.stacks(model)
                for j, block in enumerate(self.stack_blocks(model, s))]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [block for _, block in self.named_blocks(model)]

    def submodel_of_block(self, model: nn.Module) -> dict[str, str]:
        return {f"{s.path}.{j}": s.submodel for s in self.stacks(model)
                for j in range(len(self.stack_blocks(model, s)))}

    def prunable_layers(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Every Linear inside a block, by its name relative to the block (as Wanda does)."""
        return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass(frozen=True)
class DecoderAdapter(Adapter):
    """A causal LM: embeddings -> `blocks_path` blocks -> `final_norm_paths` -> `head_path`."""

    family: str
    blocks_path: str
    final_norm_paths: tuple[str, ...]
    head_path: str = "lm_head"

    @property
    def tasks(self) -> tuple[str, ...]:  # type: ignore[override]
        return FAMILIES["causal_lm"].tasks

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


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a loaded model: decoder LMs by config.model_type, vision-language
    models by their transformers class (one checkpoint type serves several heads)."""
    from ecoflap.models.vision_language import VISION_LANGUAGE

    cls = type(model).__name__
    if cls in VISION_LANGUAGE:
        return VISION_LANGUAGE[cls]
    if getattr(model.config, "model_type", None) in DECODERS:
        return decoder_adapter(model)
    raise ValueError(
        f"no adapter for {cls} (model_type {getattr(model.config, 'model_type', None)!r}); supported: "
        f"decoder LMs {', '.join(sorted(DECODERS))} and {', '.join(sorted(VISION_LANGUAGE))}. "
        "Add one in ecoflap/models/adapters.py or vision_language.py"
    )


def model_layout(model: nn.Module, adapter: Adapter) -> dict[str, dict[str, int]]:
    """{block name: {full layer name: weight count}} for every prunable layer, in model order."""
    return {prefix: {f"{prefix}.{n}": layer.weight.numel() for n, layer in adapter.prunable_layers(block).items()}
            for prefix, block in adapter.named_blocks(model)}
