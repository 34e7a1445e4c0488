"""The built-in dataset's cache: exact pixels and labels, atomic and idempotent materialization."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasources.builtin as builtin
from datasources.builtin import MANIFEST, class_folder_names, parse_builtin, resolve_data
from datasources.fashion_mnist import CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from datasources.imagefolder import scan_image_folder

pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST files not installed")
COUNTS = {"train": 60, "test": 20}


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    with gzip.open(path, "wb") as fh:
        fh.write(np.array([magic, *array.shape], dtype=">u4").tobytes() + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_idx(tmp_path_factory) -> Path:
    """The first real Fashion-MNIST images of each split, as idx files of their own (fast to materialize)."""
    folder = tmp_path_factory.mktemp("fmnist-idx")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = load_fashion_mnist(split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[:COUNTS[split]])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[:COUNTS[split]])
    return folder


def test_png_folder_holds_the_exact_pixels_and_labels(small_idx, tmp_path) -> None:
    for split in ("train", "test"):
        root = Path(resolve_data("torchvision", f"fashion-mnist:{small_idx}", split, root=tmp_path))
        assert root.name == split
        index = scan_image_folder(root)
        assert index.classes == class_folder_names() and not index.bad_files
        images, labels = load_fashion_mnist(split, small_idx)
        assert len(index.samples) == len(images)
        for path, label in index.samples:
            source = int(Path(path).stem)  # files are named by their index in the split
            assert label == labels[source]
            with Image.open(path) as img:
                assert img.mode == "L" and np.array_equal(np.asarray(img), images[source])


def test_class_folders_sort_in_label_order() -> None:
    names = class_folder_names()
    assert sorted(names) == names and len(names) == len(CLASSES)
    assert names[0] == "00_T-shirt-top" and all("/" not in name for name in names)


def mtimes(root: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_second_call_does_nothing(small_idx, tmp_path, monkeypatch) -> None:
    first = resolve_data("dali", f"fashion-mnist:{small_idx}", root=tmp_path)
    before = mtimes(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(builtin, "write_png_folder", fail)
    assert resolve_data("dali", f"fashion-mnist:{small_idx}", root=tmp_path) == first
    assert mtimes(tmp_path) == before


def test_partial_cache_is_rebuilt_not_trusted(small_idx, tmp_path) -> None:
    first = Path(resolve_data("torchvision", f"fashion-mnist:{small_idx}", root=tmp_path))
    # An interrupted copy made without the publish step: some PNGs, no manifest.
    (first / MANIFEST).unlink()
    for png in sorted(first.rglob("*.png"))[::2]:
        png.unlink()
    again = Path(resolve_data("torchvision", f"fashion-mnist:{small_idx}", root=tmp_path))
    assert again == first and len(list(again.rglob("*.png"))) == COUNTS["train"]
    # A manifest for another count (a stale cache of different source files) is not trusted either.
    manifest = json.loads((again / MANIFEST).read_text())
    (again / MANIFEST).write_text(json.dumps({**manifest, "count": 5}))
    resolve_data("torchvision", f"fashion-mnist:{small_idx}", root=tmp_path)
    assert json.loads((again / MANIFEST).read_text()) == manifest


def test_interrupted_build_leaves_nothing(small_idx, tmp_path, monkeypatch) -> None:
    calls = []
    real_save = Image.Image.save

    def save_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        resolve_data("torchvision", f"fashion-mnist:{small_idx}", root=tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], "an interrupted build must remove its temp folder"


def test_concurrent_builder_that_published_first_wins(small_idx, tmp_path, monkeypatch) -> None:
    # Another process publishes while this one is still writing: this one keeps theirs, drops its own.
    published = []
    real_write = builtin.write_png_folder

    def write_while_other_publishes(images, labels, out):
        real_write(images, labels, out)
        if not published:
            published.append(1)
            monkeypatch.setattr(builtin, "write_png_folder", real_write)
            resolve_data("torchvision", f"fashion-mnist:{small_idx}", root=tmp_path)  # "the other process"

    monkeypatch.setattr(builtin, "write_png_folder", write_while_other_publishes)
    final = Path(resolve_data("torchvision", f"fashion-mnist:{small_idx}", root=tmp_path))
    assert len(list(final.rglob("*.png"))) == COUNTS["train"]
    assert [p.name for p in final.parent.iterdir()] == ["train"], "the losing temp copy must be removed"


def test_non_builtin_data_passes_through(tmp_path) -> None:
    assert resolve_data("torchvision", "data/imagenet/train", root=tmp_path) == "data/imagenet/train"
    assert resolve_data("synthetic", "fashion-mnist", root=tmp_path) == "fashion-mnist"
    assert list(tmp_path.iterdir()) == []
    assert parse_builtin("fashion-mnist") == FASHION_MNIST_DIR
    with pytest.raises(ValueError, match="after the colon"):
        parse_builtin("fashion-mnist:")


def test_default_source_gets_the_readable_cache_name(tmp_path, small_idx) -> None:
    assert builtin._dataset_dir(FASHION_MNIST_DIR, tmp_path) == tmp_path / "fashion-mnist"
    assert builtin._dataset_dir(small_idx, tmp_path).name.startswith("fashion-mnist-")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ffcv_gets_a_readable_beton(small_idx, tmp_path) -> None:
    pytest.importorskip("ffcv")
    from pipelines.ffcv_loader import read_beton

    path = resolve_data("ffcv", f"fashion-mnist:{small_idx}", "test", root=tmp_path)
    assert path.endswith("test.beton")
    reader = read_beton(path)
    assert reader.num_samples == COUNTS["test"]
    assert resolve_data("ffcv", f"fashion-mnist:{small_idx}", "test", root=tmp_path) == path
