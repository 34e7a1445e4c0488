"""Reader for the built-in Fashion-MNIST dataset (idx files, gzip-compressed).

    images, labels = load_fashion_mnist("train")   # uint8 (60000, 28, 28), int64 (60000,)

The idx format: big-endian magic (0x0803 images, 0x0801 labels), one big-endian uint32 per
dimension, then the raw uint8 data.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# Every image is IMAGE_SIDE x IMAGE_SIDE pixels (the trainer's default --res for it).
IMAGE_SIDE = 28
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}
_MAGIC = {1: 0x0801, 3: 0x0803}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file {path} is missing; set FASHION_MNIST_DIR to the folder "
                                "holding the *-idx?-ubyte.gz files")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # not gzip, cut short, or corrupt
        raise ValueError(f"{path} is not a complete gzip file ({err}); download it again") from err
    if len(raw) < 4 * (1 + ndim):
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than an idx{ndim} header")
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != _MAGIC[ndim]:
        raise ValueError(f"{path} is not an idx{ndim} uint8 file (magic {int(header[0]):#x})")
    shape = tuple(int(d) for d in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) of the 'train' or 'test' split.

    Parameters
    ----------
    split: 'train' (60000 images) or 'test' (10000); ValueError otherwise.
    root: the folder holding the *-idx?-ubyte.gz files (default: FASHION_MNIST_DIR, $FASHION_MNIST_DIR or
        /usr/share/datasets/fashion-mnist); FileNotFoundError when a file is missing, ValueError when one is
        corrupt or truncated.
    """
    if split not in _PREFIX:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    images = _read_idx(folder / f"{_PREFIX[split]}-images-idx3-ubyte.gz", 3)
    labels = _read_idx(folder / f"{_PREFIX[split]}-labels-idx1-ubyte.gz", 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels
