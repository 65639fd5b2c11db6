"""The pruned checkpoint, written block by block: each block goes to its own shard the moment
the engine has pruned it, the rest (blocks of a stack kept dense, then everything outside the
blocks) at the end, then the index, config and tokenizer. The model is never held whole for
saving, which is what lets offload: disk prune a model larger than host memory; the other
modes write the same files, so a checkpoint's hash does not depend on the offload mode.

Tensor names and the set of tensors are the source checkpoint's, except that a tied group (a
tied LM head and the embeddings) is written under one name, the one save_pretrained keeps, even
where the source stores both; dtypes are the model's as loaded."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from ecoflap.models.base import Adapter
from ecoflap.models.offload import point_to, resident
from ecoflap.models.shards import CheckpointFiles, ShardWriter

log = logging.getLogger(__name__)


class PrunedCheckpoint:
    """Pass `write_block` to prune_sequential(on_block_pruned=), then call `finish`."""

    def __init__(self, model: nn.Module, adapter: Adapter, source: str | Path, out: str | Path):
        self.model = model
        self.source = Path(source)
        self.names = set(CheckpointFiles(source).names())
        self.blocks = adapter.named_blocks(model)
        self.out = Path(out)
        self.writer = ShardWriter(self.out, len(self.blocks) + 1)  # a shard per block, one for the rest
        self.written: set[str] = set()
        self.seconds = 0.0  # time spent writing, so that a pruning pass's compute time can leave it out

    def names_match(self) -> bool:
        """Whether the model's tensor names are the source checkpoint's (false for a checkpoint
        transformers renames while loading; such a model is saved whole with save_pretrained)."""
        state = set(self.model.state_dict())
        return all(name in state for name in self.names)

    def write_block(self, name: str, block: nn.Module) -> None:
        """Write a block (resident: its weights are in memory) to the next shard; offload: disk
        reads it from there from now on."""
        t0 = time.perf_counter()
        tensors = {f"{name}.{k}": v for k, v in block.state_dict().items() if f"{name}.{k}" in self.names}
        point_to(block, self.writer.write(tensors))
        self.written.add(name)
        self.seconds += time.perf_counter() - t0

    def _one_name_per_tied_group(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """safetensors refuses two names for one tensor; a source that stores both names of a tied
        group (equal values, as some converted checkpoints do) would give two. Keep the name
        save_pretrained keeps (transformers' own rule), from which from_pretrained ties the rest."""
        return remove_tied_weights_from_state_dict(dict(tensors), self.model)  # it deletes from the dict it is given

    def finish(self, processors: Any) -> None:
        log.info("pruned checkpoint: writing the blocks left dense, the tensors outside the blocks, the index, "
                 "config and tokenizer")
        for name, block in self.blocks:  # a stack the allocation leaves dense
            if name not in self.written:
                with resident(block):
                    self.write_block(name, block)
        t0 = time.perf_counter()
        prefixes = tuple(f"{name}." for name, _ in self.blocks)
        rest = {k: v for k, v in self.model.state_dict().items() if k in self.names and not k.startswith(prefixes)}
        kept = self._one_name_per_tied_group(rest)
        self.writer.write(kept)
        missing = self.names - set(self.writer.weight_map) - (rest.keys() - kept.keys())
        if missing:
            raise RuntimeError(f"the pruned checkpoint lacks {len(missing)} tensors of the source "
                               f"({', '.join(sorted(missing)[:4])}); nothing was kept")
        self.writer.finish()
        self.model.config.save_pretrained(self.out)
        # the source's own generation settings, as they were (a model built without weights
        # derives slightly different defaults than one loaded with from_pretrained)
        if (self.source / "generation_config.json").exists():
            shutil.copyfile(self.source / "generation_config.json", self.out / "generation_config.json")
        processors.save_pretrained(self.out)
        self.seconds += time.perf_counter() - t0
        log.info("pruned checkpoint written: %d shards, %.2f GB", self.writer.n_shards, self.writer.total_size / 1e9)
