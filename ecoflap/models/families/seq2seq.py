"""Encoder-decoder language models (T5 / FlanT5): embeddings -> encoder blocks -> decoder
blocks (each reading the encoder's output through cross-attention) -> final norm -> LM head.
Config family `seq2seq_lm`; keyed by config.json's model_type like the decoders.

Calibration is text split into an encoder input and a decoder target (data/calibration.py,
`seq2seq_calibration`), and the loss is the model's own seq2seq cross-entropy on the target
tokens, as the authors' FlanT5 pruner computes it (their LAVIS t5.py: `labels=` with padding
at -100). The decoder's blocks are calibrated on what the already pruned encoder produces,
because the capture runs the whole model up to the decoder stack."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ecoflap.models.base import Adapter, Batch, Stack, at_least_fp32


@dataclass(frozen=True)
class Seq2SeqAdapter(Adapter):
    """T5ForConditionalGeneration and its relatives. Both stacks have per-block inputs: T5's
    block 0 computes the relative position bias and hands it to the later blocks."""

    architecture: str  # config.json's model_type
    encoder_path: str = "encoder.block"
    decoder_path: str = "decoder.block"
    family: str = "seq2seq_lm"

    def stacks(self, model: nn.Module) -> list[Stack]:
        return [Stack("encoder", self.encoder_path, "language", per_block_inputs=True, mask_key="attention_mask"),
                Stack("decoder", self.decoder_path, "language", per_block_inputs=True, mask_key="labels",
                      cross_mask_key="attention_mask")]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the target's real tokens (labels -100 at padding)."""
        return at_least_fp32(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   labels=batch["labels"], use_cache=False).loss)


# model_type (from config.json) -> adapter
SEQ2SEQ: dict[str, Seq2SeqAdapter] = {
    "t5": Seq2SeqAdapter("t5"),
    "mt5": Seq2SeqAdapter("mt5"),
}
