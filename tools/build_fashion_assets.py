#!/usr/bin/env python3
"""Vendor a class-balanced subset of Fashion-MNIST (MIT licence, Zalando Research) for the
offline vision-language default: the first 600 training and 100 test images of each of
the 10 classes, in file order, kept in the original gzip IDX format.

Source (fetched by hand, never at run time)::

    apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb FM
    python tools/build_fashion_assets.py --source FM/usr/share/datasets/fashion-mnist
"""
from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "ecoflap" / "assets" / "vision"
PER_CLASS = {"train": 600, "t10k": 100}


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        images = read_idx(args.source / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{split}-labels-idx1-ubyte.gz")
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        name = "train" if split == "train" else "test"
        write_idx(OUT / f"fashion_mnist_{name}_images.gz", images[keep])
        write_idx(OUT / f"fashion_mnist_{name}_labels.gz", labels[keep])
        print(name, images[keep].shape, np.bincount(labels[keep]))


if __name__ == "__main__":
    main()
