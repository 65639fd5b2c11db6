"""Safetensors checkpoints tensor by tensor: read named tensors from a folder (one file, or
shards with transformers' index), and write a checkpoint shard by shard, so that neither
side ever holds a whole model (offload: disk reads each block when it is reached; pruning
writes each block as soon as it is pruned).

The folder written is what transformers' `save_pretrained` writes for a sharded model:
`model-00001-of-0000N.safetensors` files (metadata {"format": "pt"}) and
`model.safetensors.index.json` mapping every tensor name to its file; `from_pretrained`
loads it as it is."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointFiles:
    """Where each tensor of a safetensors checkpoint folder lives, its shape, and reading it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / SINGLE_FILE).exists():
            with safe_open(str(self.folder / SINGLE_FILE), framework="pt") as f:
                self.file_of = {name: self.folder / SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; offload: disk reads "
                                    "safetensors checkpoints written by save_pretrained")
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.dtypes: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self.file_of)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers (nothing is read)."""
        if self._shapes is None:
            self._shapes = {}
            for path, names in _by_file(self.file_of, self.file_of).items():
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        sliced = f.get_slice(name)
                        self._shapes[name] = tuple(sliced.get_shape())
                        self.dtypes[name] = sliced.get_dtype()
        return self._shapes

    def stored_bytes(self) -> int:
        shapes = self.shapes()
        return sum(_numel(shapes[n]) * DTYPE_BYTES.get(self.dtypes[n], 4) for n in shapes)

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed before returning (the
        memory-mapped pages a read touched are released with it)."""
        out = {}
        for path, wanted in _by_file(self.file_of, names).items():
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in wanted:
                    out[name] = f.get_tensor(name)
        return out

    def point(self, names: Iterable[str], path: Path) -> None:
        """Read these tensors from `path` from now on (a block pruned and written out)."""
        for name in names:
            self.file_of[name] = path


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _by_file(file_of: dict[str, Path], names: Iterable[str]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for name in names:
        if name not in file_of:
            raise KeyError(f"tensor {name} is not in the checkpoint")
        grouped.setdefault(file_of[name], []).append(name)
    return grouped


class ShardWriter:
    """Writes a checkpoint as `n_shards` files, one `write` call per shard, then the index."""

    def __init__(self, folder: str | Path, n_shards: int):
        self.folder = Path(folder)
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> Path:
        if self.written >= self.n_shards:
            raise RuntimeError(f"more shards written than the {self.n_shards} announced")
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.n_shards:05d}.safetensors"
        host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(host, str(self.folder / name), metadata={"format": "pt"})
        for k, v in host.items():
            self.weight_map[k] = name
            self.total_size += v.numel() * v.element_size()
        return self.folder / name

    def finish(self) -> None:
        if self.written != self.n_shards:
            raise RuntimeError(f"{self.written} shards written of the {self.n_shards} announced")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
