"""FFCV converter and decode-once two-crop loader, on real photos and Fashion-MNIST.

FFCV compiles its pipeline per Loader (several seconds on 2 cores), so loaders are module fixtures.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from bad_files import UNREADABLE
from loader_contract import LoaderContract
from PIL import Image

from datasets.fashion_mnist import load_fashion_mnist
from datasets.ffcv_convert import ConversionError, FolderImages, main, new_progress, write_beton
from datasets.imagefolder import scan_image_folder
from pipelines.base import LoaderConfig
from pipelines.ffcv_decoder import TwoCropDecoder, random_crop
from pipelines.ffcv_loader import FfcvTwoViewLoader, build_loader
from pipelines.views import BYOL_VIEWS

pytestmark = pytest.mark.timeout(180)

MAX_RES = 160
WHOLE = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # centre square crop: comparable to a reference
FMNIST_LIMIT = 200
# Mean absolute error (0-255 levels) between a decoded crop and the same crop of the full-resolution
# source: a JPEG q90 re-encode with 4:2:0 chroma at 160 px plus the writer's DCT-scaled draft decode
# measure 1.3-11.3 levels per image (3.8 on average) on these photos, and always less than a third of
# the error against the reference shifted by 3 px (which measures 5-46): the relative test is the
# one that tells a right crop from a wrong one whatever the image's detail.
JPEG_MAE_MAX = 16.0
JPEG_MAE_MEAN = 6.0
SHIFT_PX = 3
SHIFT_ERROR_RATIO_MAX = 0.5


@pytest.fixture(scope="module")
def dirty_beton(dirty_corpus: str, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("beton") / "dirty.beton")
    assert main(["--src", dirty_corpus, "--out", out, "--max-res", str(MAX_RES), "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def fmnist_beton(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("beton") / "fmnist.beton")
    assert main(["--src", "fashion-mnist", "--out", out, "--limit", str(FMNIST_LIMIT), "--workers", "2"]) == 0
    return out


def _config(data: str, res: int, batch_size: int, **kwargs) -> LoaderConfig:
    return LoaderConfig(data=data, batch_size=batch_size, recipe=replace(BYOL_VIEWS, res=res, **WHOLE), **kwargs)


def _epoch_crops(loader: FfcvTwoViewLoader) -> tuple[np.ndarray, np.ndarray]:
    crops, labels = zip(*((c.numpy().copy(), lab.numpy().copy()) for c, lab in loader.crops()), strict=True)
    return np.concatenate(crops), np.concatenate(labels)


# ---------------------------------------------------------------- converter


def test_converter_counts_labels_and_skips_unreadable(dirty_beton, dirty_corpus: str) -> None:
    from ffcv.reader import Reader

    path = dirty_beton
    readable = scan_image_folder(dirty_corpus, validate=True)
    reader = Reader(path)
    assert reader.num_samples == len(readable.samples) == 32 + 4  # 4 odd-but-valid files are kept
    assert {Path(p).name for p, _ in readable.bad_files} == set(UNREADABLE)
    labels = reader.metadata["f1"]
    assert labels.tolist() == [label for _, label in readable.samples]
    sizes = zip(reader.metadata["f0"]["width"], reader.metadata["f0"]["height"], strict=True)
    assert max(max(int(w), int(h)) for w, h in sizes) == MAX_RES


def test_converter_reports_unreadable_files(dirty_corpus: str, tmp_path, capfd) -> None:
    out = tmp_path / "small.beton"
    assert main(["--src", dirty_corpus, "--out", str(out), "--limit", "4", "--workers", "1"]) == 0
    captured = capfd.readouterr()
    for name in UNREADABLE:
        assert f"class_000/{name}" in captured.err
    assert "skipped 3 unreadable file(s)" in captured.out and "wrote 4 images" in captured.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src", "/nonexistent/folder"], "is not a folder"),
        (["--src", "EMPTY"], "no class sub-folders"),
        (["--src", "fashion-mnist", "--out", "/nonexistent/dir/x.beton"], "does not exist"),
        (["--src", "fashion-mnist", "--jpeg-quality", "0"], "--jpeg-quality must be in [1, 100]"),
        (["--src", "fashion-mnist", "--compress-prob", "1.5"], "--compress-prob must be in [0, 1]"),
        (["--src", "fashion-mnist", "--max-res", "4"], "--max-res must be at least 8"),
        (["--src", "fashion-mnist", "--workers", "0"], "--workers must be at least 1"),
        (["--src", "CORPUS", "--split", "test"], "--split applies only"),
    ],
)
def test_converter_rejects_bad_input_with_one_line(args, message, photo_corpus, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    args = [{"EMPTY": str(tmp_path / "empty"), "CORPUS": photo_corpus}.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.beton")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "x.beton").exists()


def test_decoder_scratch_fits_the_largest_single_image() -> None:
    """One tall and one wide image: the decode buffer must hold the larger of the two (1000 x 12 px),
    not max height x max width (1000 x 1000), since FFCV pins it per batch slot on CUDA machines."""
    from ffcv.pipeline.state import State

    decoder = TwoCropDecoder(BYOL_VIEWS.with_overrides(res=32))
    decoder.metadata = np.array([(1000, 10), (12, 1000)], dtype=[("height", "<u4"), ("width", "<u4")])
    state, (crops, scratch) = decoder.declare_state_and_memory(
        State(jit_mode=False, device=torch.device("cpu"), shape=(), dtype=np.dtype("u1")))
    assert crops.shape == (2, 32, 32, 3) and state.shape == (2, 32, 32, 3)
    assert scratch.shape == (12 * 1000 * 3,)


def test_converter_limits_resolution_to_512_by_default(photo_corpus: str, tmp_path) -> None:
    from ffcv.reader import Reader

    source = sorted(Path(photo_corpus).glob("*/*"))[0]
    big = tmp_path / "src" / "class_a"
    big.mkdir(parents=True)
    Image.open(source).convert("RGB").resize((900, 700)).save(big / "big.JPEG", quality=90)
    out = tmp_path / "big.beton"
    assert main(["--src", str(tmp_path / "src"), "--out", str(out), "--workers", "1"]) == 0
    image = Reader(str(out)).metadata["f0"][0]  # fields by position: image, label
    assert max(image["width"], image["height"]) == 512
    assert main(["--src", str(tmp_path / "src"), "--out", str(out), "--workers", "1", "--max-res", "0"]) == 0
    image = Reader(str(out)).metadata["f0"][0]
    assert (image["width"], image["height"]) == (900, 700)


class _FailsAt:
    """Real photos, but sample `bad` raises in the writer's worker (a mid-write failure)."""

    def __init__(self, samples, bad: int) -> None:
        self.images, self.bad = FolderImages(samples, 64), bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if index == self.bad:
            raise OSError("simulated read failure")
        return self.images[index]


@pytest.mark.timeout(60)
def test_failed_conversion_leaves_no_output(photo_corpus: str, tmp_path) -> None:
    from ffcv.fields import RGBImageField

    samples = scan_image_folder(photo_corpus).samples[:40]
    out = tmp_path / "out.beton"
    with pytest.raises(ConversionError, match="writer worker exited"), new_progress() as progress:
        write_beton(_FailsAt(samples, bad=30), out, RGBImageField(write_mode="jpg"), workers=2, progress=progress)
    assert os.listdir(tmp_path) == []  # neither the .beton nor the temp file


def test_interrupted_conversion_leaves_no_output(photo_corpus: str, tmp_path, monkeypatch) -> None:
    from ffcv.fields import RGBImageField

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    samples = scan_image_folder(photo_corpus).samples[:40]
    with pytest.raises(KeyboardInterrupt), new_progress() as progress:
        monkeypatch.setattr(progress, "advance", interrupt)
        write_beton(FolderImages(samples, 64), tmp_path / "out.beton", RGBImageField(), workers=2, progress=progress)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- crop parameters


def _draws(height: int, width: int, n: int, view: int = 0) -> np.ndarray:
    scale, log_ratio = BYOL_VIEWS.crop_scale, BYOL_VIEWS.log_ratio
    return np.array([random_crop(height, width, *scale, *log_ratio, 0, 0, i, view) for i in range(n)])


# The largest crop with a 3/4..4/3 aspect ratio: the whole image, or 240 x 320 of a 500 x 240 portrait.
@pytest.mark.parametrize(("height", "width", "max_area"), [(300, 400, 1.0), (500, 240, 0.64), (224, 224, 1.0)])
def test_crop_parameters_follow_recipe(height: int, width: int, max_area: float) -> None:
    top, left, h, w = _draws(height, width, 20000).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    # w and h are rounded to whole pixels: allow one pixel of slack on each side.
    slack = (h + w + 1) / (height * width)
    assert (area >= 0.08 - slack).all() and (area <= 1.0).all()
    log_ratio = np.log(w / h)
    ratio_slack = 1.0 / np.minimum(h, w)
    assert (log_ratio >= math.log(3 / 4) - ratio_slack).all() and (log_ratio <= math.log(4 / 3) + ratio_slack).all()
    # The draws cover the whole recipe range, not a corner of it.
    assert area.min() < 0.085 and area.max() > 0.95 * max_area
    assert log_ratio.min() < math.log(3 / 4) + 0.02 and log_ratio.max() > math.log(4 / 3) - 0.02


def test_crop_fallback_for_extreme_aspect_ratio() -> None:
    # No 3/4..4/3 crop with 8% of the area fits a 10 x 1000 strip: the centred 4/3 crop is used.
    assert {tuple(c) for c in _draws(10, 1000, 50)} == {(0, (1000 - 13) // 2, 10, 13)}


def test_two_views_get_different_crops() -> None:
    view0, view1 = _draws(300, 400, 1000, view=0), _draws(300, 400, 1000, view=1)
    assert (view0 != view1).any(axis=1).all()


# ---------------------------------------------------------------- loader


def _reference_crop(path: str, res: int) -> np.ndarray:
    """Source photo, resized like the writer (longest side MAX_RES), centre square, bilinear to res."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    ratio = MAX_RES / max(rgb.shape[:2])
    if ratio < 1:
        size = (np.array(rgb.shape[1::-1]) * ratio).astype(int)
        rgb = cv2.resize(rgb, tuple(size), interpolation=cv2.INTER_AREA)
    side = min(rgb.shape[:2])
    top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
    return cv2.resize(rgb[top : top + side, left : left + side], (res, res), interpolation=cv2.INTER_LINEAR)


@pytest.mark.slow
def test_decoded_jpeg_crops_match_sources(dirty_beton, dirty_corpus: str) -> None:
    loader = build_loader(_config(dirty_beton, 64, 8, drop_last=False), order="sequential")
    crops, labels = _epoch_crops(loader)
    samples = scan_image_folder(dirty_corpus).samples
    assert labels.tolist() == [label for _, label in samples]
    errors = []
    for (path, _), pair in zip(samples, crops, strict=True):
        reference = _reference_crop(path, 64).astype(np.float64)
        for crop in pair.astype(np.float64):
            error = np.abs(crop - reference).mean()
            shifted = np.abs(crop[:, SHIFT_PX:] - reference[:, :-SHIFT_PX]).mean()
            assert error < SHIFT_ERROR_RATIO_MAX * shifted, f"{path}: {error:.2f} levels, {shifted:.2f} when shifted"
            errors.append((error, path))
    worst, worst_path = max(errors)
    assert worst < JPEG_MAE_MAX, f"{worst_path}: mean abs error {worst:.2f} levels"
    assert np.mean([e for e, _ in errors]) < JPEG_MAE_MEAN


@pytest.fixture(scope="module")
def fmnist_shards(fmnist_beton: str) -> list[FfcvTwoViewLoader]:
    return [build_loader(_config(fmnist_beton, 28, 10, rank=rank, world_size=2, drop_last=False)) for rank in (0, 1)]


@pytest.mark.slow
def test_ranks_partition_fashion_mnist_with_exact_pixels(fmnist_shards) -> None:
    images, labels = load_fashion_mnist("train")
    keep = np.unique(np.linspace(0, len(images) - 1, FMNIST_LIMIT).round().astype(int))
    source = {images[i].tobytes(): (i, labels[i]) for i in keep}
    seen = []
    for shard in fmnist_shards:
        crops, got_labels = _epoch_crops(shard)
        assert len(crops) == FMNIST_LIMIT // 2 and len(shard) == FMNIST_LIMIT // 20
        for pair, label in zip(crops, got_labels, strict=True):
            # raw mode + whole-image 28 px crop: both views are the source image exactly, in 3 channels.
            assert (pair == pair[..., :1]).all() and (pair[0] == pair[1]).all()
            index, want = source[pair[0, :, :, 0].tobytes()]
            assert label == want
            seen.append(index)
    assert sorted(seen) == sorted(keep.tolist())  # disjoint shards that cover every sample


@pytest.fixture(scope="module")
def byol_loader(dirty_beton) -> FfcvTwoViewLoader:
    return build_loader(LoaderConfig(data=dirty_beton, batch_size=8, recipe=replace(BYOL_VIEWS, res=32)))


@pytest.mark.slow
def test_epochs_reproducible_and_views_differ(byol_loader: FfcvTwoViewLoader) -> None:
    byol_loader.set_epoch(3)
    first, labels_first = _epoch_crops(byol_loader)
    byol_loader.set_epoch(3)
    again, labels_again = _epoch_crops(byol_loader)
    byol_loader.set_epoch(4)
    other, _ = _epoch_crops(byol_loader)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(labels_first, labels_again)
    assert not np.array_equal(first, other)
    assert (first[:, 0] != first[:, 1]).any(axis=(1, 2, 3)).all()  # the two crops of each image differ


@pytest.mark.slow
def test_loader_yields_contract_batches(byol_loader: FfcvTwoViewLoader) -> None:
    batches = list(byol_loader)
    assert len(batches) == len(byol_loader) == 36 // 8
    for view1, view2, labels in batches:
        for view in (view1, view2):
            assert view.shape == (8, 3, 32, 32) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (8,)


@pytest.mark.slow
def test_loader_leaves_torch_thread_count_alone(dirty_beton) -> None:
    """ffcv sets torch's thread count to its worker count when a Loader is built and at each epoch;
    the training step must keep the threads it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = LoaderConfig(data=dirty_beton, batch_size=8, workers=1, recipe=replace(BYOL_VIEWS, res=16))
        loader = build_loader(cfg)
        assert torch.get_num_threads() == 2
        for _ in loader:
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(data="/nonexistent.beton"), "does not exist"),
        (dict(data="NOT_BETON"), "not a readable .beton"),
        (dict(batch_size=64), "larger than this rank's 36 samples"),
        (dict(batch_size=20, world_size=2), "larger than this rank's 18 samples"),
    ],
)
def test_loader_rejects_bad_input_before_compiling(dirty_beton, tmp_path, change, message) -> None:
    not_beton = tmp_path / "x.beton"
    not_beton.write_bytes(b"definitely not a beton file" * 10)
    change = {k: (str(not_beton) if v == "NOT_BETON" else v) for k, v in change.items()}
    cfg = replace(LoaderConfig(data=dirty_beton, batch_size=8), **change)
    with pytest.raises(ValueError, match=message):
        build_loader(cfg)


def test_loader_rejects_quasi_random_with_several_ranks(dirty_beton) -> None:
    with pytest.raises(ValueError, match="single-process only"):
        build_loader(LoaderConfig(data=dirty_beton, batch_size=8, world_size=2), order="quasi_random")


@pytest.mark.slow
def test_not_in_memory_reads_every_sample_once_in_quasi_random_order(dirty_beton) -> None:
    """in_memory=False: FFCV's QUASI_RANDOM order, process cache instead of the OS page cache; an
    epoch still yields every sample exactly once, in another order than the file's."""
    loader = build_loader(replace(_config(dirty_beton, 32, 8, drop_last=False), in_memory=False))
    assert type(loader.loader.traversal_order).__name__ == "QuasiRandom"
    assert loader.loader._args["os_cache"] is False
    crops, _ = _epoch_crops(loader)
    in_file_order, _ = _epoch_crops(build_loader(_config(dirty_beton, 32, 8, drop_last=False), order="sequential"))
    got, want = [c[0].tobytes() for c in crops], [c[0].tobytes() for c in in_file_order]
    assert sorted(got) == sorted(want) and got != want


class FfcvContract(LoaderContract):
    """The loader contract through the FFCV path: each folder is converted once to a .beton."""

    module = "pipelines.ffcv_loader"
    _betons: dict[str, str] = {}

    def prepare(self, folder: str) -> str:
        if folder not in self._betons:
            out = str(Path(folder).with_name(Path(folder).name + ".beton"))
            assert main(["--src", folder, "--out", out, "--workers", "2"]) == 0
            self._betons[folder] = out
        return self._betons[folder]

    def test_dirty_corpus_skips_unreadable_and_keeps_odd_files(self, dirty_corpus):
        pytest.skip("FFCV reads a converted .beton: test_converter_counts_labels_and_skips_unreadable covers it")


class TestFfcvLoaderContract(FfcvContract):
    pass
