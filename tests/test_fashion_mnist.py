"""The Fashion-MNIST reader against the dataset's published facts."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from datasources.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST files not installed")


@needs_fashion_mnist
@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_shapes_and_balanced_labels(split: str, count: int) -> None:
    images, labels = load_fashion_mnist(split)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.int64
    # Both splits are exactly balanced over the 10 classes.
    assert np.bincount(labels).tolist() == [count // 10] * 10


@needs_fashion_mnist
def test_pixel_statistics_match_published_values() -> None:
    images, _ = load_fashion_mnist("train")
    unit = images.astype(np.float64) / 255
    # The commonly quoted normalization constants of the training split.
    assert unit.mean() == pytest.approx(0.2860, abs=5e-4)
    assert unit.std() == pytest.approx(0.3530, abs=5e-4)


@needs_fashion_mnist
def test_bad_split_and_bad_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("validation")
    with pytest.raises(FileNotFoundError, match="FASHION_MNIST_DIR"):
        load_fashion_mnist("train", root=tmp_path)
    header = np.array([0x0803, 2, 28, 28], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + bytes(28 * 28))  # one image of the two announced
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(np.array([0x0801, 2], dtype=">u4").tobytes() + bytes(2))
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("train", root=tmp_path)


@pytest.mark.parametrize(("make", "message"), [
    (lambda data: data[: len(data) // 2], "is not a complete gzip file"),
    (lambda data: b"not gzip at all", "is not a complete gzip file"),
    (lambda data: gzip.compress(b"\x00\x00"), "is truncated: 2 bytes"),
])
def test_damaged_fashion_mnist_file_is_one_clear_error(tmp_path, make, message):
    images = gzip.compress(np.array([0x0803, 1, 2, 2], ">u4").tobytes() + bytes(4))
    labels = gzip.compress(np.array([0x0801, 1], ">u4").tobytes() + bytes(1))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(labels)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    assert load_fashion_mnist("test", tmp_path)[0].shape == (1, 2, 2)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(make(images))
    with pytest.raises(ValueError, match=f"t10k-images-idx3-ubyte.gz {message}"):
        load_fashion_mnist("test", tmp_path)
