"""Data that changes or lies: files that vanish or break after the scan, formats behind a wrong name,
symlink loops, and pixels that must be the same on every decode path (issue #14)."""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.imagefolder import load_index, open_rgb, scan_image_folder
from pipelines.base import LoaderConfig
from pipelines.views import BYOL_VIEWS

RES = 16


def _pixels(seed: int, shape: tuple[int, ...] = (24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _folder(root: Path, count: int = 6, classes: int = 2) -> list[Path]:
    """`count` small PNGs spread over `classes` class folders."""
    paths = []
    for i in range(count):
        path = root / f"class_{i % classes}" / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(i)).save(path)
        paths.append(path)
    return paths


def _corrupt_body_jpeg(path: Path) -> None:
    """A JPEG with intact SOI/EOI markers (the scan passes it) but a second frame header inside its
    entropy-coded data, which libjpeg (PIL) rejects: 'broken data stream'."""
    Image.fromarray(_pixels(7, (64, 64, 3))).save(path, quality=90)
    data = bytearray(path.read_bytes())
    body = data.index(b"\xff\xda") + 40
    data[body:body + 2] = b"\xff\xc0"
    path.write_bytes(bytes(data))


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL writes 16-bit only for grayscale)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- item 5: a file that vanishes or fails to decode after the scan -----------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 1])
def test_torchvision_skips_files_that_vanish_or_break_after_the_scan(tmp_path, caplog, workers):
    from pipelines.torchvision_loader import build_loader

    paths = _folder(tmp_path)
    broken = tmp_path / "class_1" / "broken.JPEG"
    _corrupt_body_jpeg(broken)
    loader = build_loader(LoaderConfig(str(tmp_path), batch_size=4, workers=workers, drop_last=False,
                                       recipe=BYOL_VIEWS.with_overrides(res=RES)))
    assert len(loader.index.samples) == 7  # the scan cannot see either problem
    paths[2].unlink()
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        seen = sum(labels.numel() for _, _, labels in loader)
    assert seen == 5
    assert sorted(path for path, _ in loader.skipped) == sorted([str(paths[2]), str(broken)])
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert str(paths[2]) in messages and "no longer exists" in messages
    assert str(broken) in messages and "cannot decode" in messages


def _dali_loader(root: Path, **overrides):
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from pipelines.dali_loader import build_loader

    return build_loader(LoaderConfig(str(root), batch_size=4, workers=1, drop_last=False,
                                     recipe=BYOL_VIEWS.with_overrides(res=RES), **overrides))


@pytest.mark.timeout(120)
def test_dali_drops_files_deleted_after_the_scan_and_goes_on(tmp_path, caplog):
    """The reader's error names one deleted file; the loader drops every deleted one (warning with each
    name), rebuilds and finishes the epoch. Enough files that DALI has not read them all ahead."""
    paths = _folder(tmp_path, count=80)
    loader = _dali_loader(tmp_path)
    deleted = paths[41::2]
    for path in deleted:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        batches = [labels.numel() for _, _, labels in loader]
    assert sorted(path for path, _ in loader.skipped) == sorted(map(str, deleted))
    assert len(loader.index.samples) == 80 - len(deleted) and len(batches) == len(loader)
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert all(str(path) in messages for path in deleted)
    assert sum(labels.numel() for _, _, labels in loader) == 80 - len(deleted)  # the next epoch: all the rest


@pytest.mark.timeout(120)
def test_dali_drops_a_file_that_becomes_undecodable_after_the_scan(tmp_path, caplog):
    """DALI's decoder names no file: the loader re-checks the files and finds the one that is now a GIF."""
    paths = _folder(tmp_path, count=80)
    loader = _dali_loader(tmp_path)
    for path in paths[40:]:
        Image.open(path).convert("P").save(path, format="GIF")
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        total = sum(labels.numel() for _, _, labels in loader)
    assert total > 0 and sorted(path for path, _ in loader.skipped) == sorted(map(str, paths[40:]))
    assert "GIF file, which DALI cannot decode" in loader.skipped[0][1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("operator", "failure", "expected"), [
    # A decode failure no file can be found for: one line pointing to the deep check and the PIL loader.
    ("decoders.image", "nvImageCodec failure: '#4'",
     r"nvImageCodec failure: .#4.; no file of it .*--deep-check .*--loader torchvision"),
    # A failure that is not about a file is reported as it is.
    ("gaussian_blur", "out of memory", r"^DALI failed while loading .*: out of memory$"),
])
def test_dali_failure_without_a_file_to_drop_is_one_clear_error(tmp_path, monkeypatch, operator, failure, expected):
    import pipelines.dali_loader as dali

    _folder(tmp_path)
    loader = _dali_loader(tmp_path)

    def failing():
        raise RuntimeError(f"Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.{operator}`,\n"
                           f"encountered:\n{failure}\n")
        yield

    monkeypatch.setattr(loader, "_iterator", failing())
    with pytest.raises(dali.DaliLoaderError, match=expected):
        next(iter(loader))
    assert not loader.skipped


@pytest.mark.timeout(120)
def test_dali_drops_files_deleted_before_its_first_batch(tmp_path, caplog):
    """The iterator decodes its first batch while it is made: a failure there is recovered the same way."""
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from pipelines.dali_loader import DaliTwoViewLoader

    paths = _folder(tmp_path, count=12)
    index = scan_image_folder(tmp_path)
    for path in paths[::2]:
        path.unlink()
    loader = DaliTwoViewLoader(LoaderConfig(str(tmp_path), batch_size=4, workers=1, drop_last=False,
                                            recipe=BYOL_VIEWS.with_overrides(res=RES)), index)
    assert sorted(path for path, _ in loader.skipped) == sorted(map(str, paths[::2]))
    assert sum(labels.numel() for _, _, labels in loader) == 6


@pytest.mark.timeout(120)
def test_dali_finds_a_corrupt_body_by_decoding_a_small_folder(tmp_path):
    """A PNG cut short but ending in 'IEND' passes the scan's tail check; DALI's decoder fails on it
    without naming it, so the loader decodes the (small) folder with PIL to find it."""
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from pipelines.dali_loader import DaliTwoViewLoader

    paths = _folder(tmp_path, count=12)
    index = scan_image_folder(tmp_path)
    cut = paths[0].read_bytes()
    for path in paths[:6]:
        path.write_bytes(cut[:60] + b"IEND")
    loader = DaliTwoViewLoader(LoaderConfig(str(tmp_path), batch_size=4, workers=1, drop_last=False,
                                            recipe=BYOL_VIEWS.with_overrides(res=RES)), index)
    assert sorted(path for path, _ in loader.skipped) == sorted(map(str, paths[:6]))
    assert "cannot decode" in loader.skipped[0][1]
    assert sum(labels.numel() for _, _, labels in loader) == 6


# --- item 6: the real format behind the name ---------------------------------------------------------------


def _misnamed_folder(root: Path) -> dict[str, Path]:
    """A folder with a palette GIF, a WebP and a PNG all named .JPEG, beside plain PNGs."""
    _folder(root, count=4)
    files = {kind: root / "class_0" / f"{kind.lower()}_named.JPEG" for kind in ("GIF", "WEBP", "PNG")}
    for kind, path in files.items():
        Image.fromarray(_pixels(9)).convert("P" if kind == "GIF" else "RGB").save(path, format=kind)
    return files


def test_scan_records_the_real_format_from_the_magic_bytes(tmp_path):
    files = _misnamed_folder(tmp_path)
    index = scan_image_folder(tmp_path)
    assert {kind: index.format_of(str(path)) for kind, path in files.items()} == {k: k for k in files}
    assert index.format_of(str(tmp_path / "class_0" / "img_0.png")) == "PNG"


@pytest.mark.timeout(120)
def test_dali_leaves_out_a_gif_named_jpeg_with_a_warning_and_reads_the_rest(tmp_path, caplog):
    files = _misnamed_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        loader = _dali_loader(tmp_path)
    assert [path for path, _ in loader.bad_files] == [str(files["GIF"])]
    assert "GIF image named .JPEG: DALI cannot decode GIF" in loader.bad_files[0][1]
    assert str(files["GIF"]) in caplog.text
    assert sum(labels.numel() for _, _, labels in loader) == 4 + 2  # the WebP and PNG named .JPEG decode


@pytest.mark.timeout(60)
def test_torchvision_reads_a_gif_named_jpeg(tmp_path):
    from pipelines.torchvision_loader import build_loader

    _misnamed_folder(tmp_path)
    loader = build_loader(LoaderConfig(str(tmp_path), batch_size=4, workers=0, drop_last=False,
                                       recipe=BYOL_VIEWS.with_overrides(res=RES)))
    assert not loader.bad_files and sum(labels.numel() for _, _, labels in loader) == 7 and not loader.skipped


# --- item 7: symlink loops and the start-up count ----------------------------------------------------------


def test_symlink_loop_is_scanned_once_and_reported(tmp_path, caplog, capsys):
    _folder(tmp_path, count=6)
    os.symlink("..", tmp_path / "class_0" / "loop")  # class_0/loop/class_0/loop/... : 40 levels before ELOOP
    os.symlink(tmp_path / "class_1", tmp_path / "class_0" / "again")
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        index = load_index(tmp_path)
    assert len(index.samples) == 6
    assert [label for _, label in index.samples].count(0) == 3
    assert "loop" in caplog.text and "again" in caplog.text and "counted once" in caplog.text
    assert "data: 6 images in 2 classes" in capsys.readouterr().err


def test_start_up_line_counts_images_classes_and_skipped_files(tmp_path, capsys):
    _folder(tmp_path, count=5)
    (tmp_path / "class_0" / "empty.JPEG").write_bytes(b"")
    load_index(tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data:")]
    assert lines == [f"data: 5 images in 2 classes under {tmp_path} (1 skipped, listed above)"]


def test_start_up_line_only_on_rank_0(tmp_path, capsys, monkeypatch):
    _folder(tmp_path, count=2)
    monkeypatch.setenv("RANK", "1")
    load_index(tmp_path)
    assert "data:" not in capsys.readouterr().err


# --- item 8: the same pixels on every decode path ----------------------------------------------------------


def _dali_cpu_decode(path: Path) -> np.ndarray:
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        raw, _ = fn.readers.file(files=[str(path)])
        return fn.decoders.image(raw, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    return np.asarray(pipe.run()[0].as_array()[0])


def _exif_rotated_jpeg(path: Path) -> None:
    image = Image.fromarray(_pixels(3, (24, 40, 3)))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif, quality=95)


def _gray16_png(path: Path) -> None:
    Image.fromarray(np.linspace(0, 65535, 24 * 40).reshape(24, 40).astype(np.uint16)).save(path)


# (file maker, largest allowed difference in 8-bit levels): PIL keeps only the high byte of 16-bit RGB
# (DALI rounds), so one level there; the others are the same libjpeg-turbo / zlib decode, so exact.
PIXEL_CASES = {
    "exif_rotated.jpg": (_exif_rotated_jpeg, 0),
    "gray16.png": (_gray16_png, 0),
    "rgb16.png": (lambda path: _png16(path, np.random.default_rng(4).integers(0, 65536, (24, 40, 3))), 1),
    "palette.png": (lambda path: Image.fromarray(_pixels(5)).convert("P").save(path), 0),
    "gray_alpha.png": (lambda path: Image.fromarray(_pixels(6)).convert("LA").save(path), 0),
    "cmyk.jpg": (lambda path: Image.fromarray(_pixels(8)).convert("CMYK").save(path, quality=95), 0),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", PIXEL_CASES)
def test_open_rgb_gives_dalis_pixels(tmp_path, name):
    make, tolerance = PIXEL_CASES[name]
    path = tmp_path / name
    make(path)
    expected = _dali_cpu_decode(path).astype(int)
    got = np.asarray(open_rgb(path)).astype(int)
    assert got.shape == expected.shape  # EXIF: both rotated to (40, 24)
    assert np.abs(got - expected).max() <= tolerance


@pytest.mark.timeout(60)
def test_16_bit_png_is_not_white_in_the_evaluation_set(tmp_path):
    """The evaluation's centre crops decode through open_rgb too (16-bit PNGs used to come out 255)."""
    from evaluation.data import FolderSet

    for label in range(2):
        (tmp_path / f"class_{label}").mkdir()
        _gray16_png(tmp_path / f"class_{label}" / "gray16.png")
    images, _ = next(FolderSet(str(tmp_path), workers=0).batches(2, 16))
    assert 100 < images.float().mean() < 155  # a 0..65535 ramp: mid-grey on average, not 255


@pytest.mark.timeout(60)
def test_evaluation_set_stands_a_grey_image_in_for_a_file_deleted_after_the_scan(tmp_path, caplog):
    """Every rank reads the labels from the sample list, so the sample stays, grey, with a warning."""
    from evaluation.data import STAND_IN_GREY, FolderSet

    paths = _folder(tmp_path, count=4)
    data = FolderSet(str(tmp_path), workers=0)
    paths[1].unlink()
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        images, labels = next(data.batches(4, RES))
    assert len(images) == len(labels) == 4
    gone = [path for path, _ in data.samples].index(str(paths[1]))
    assert (images[gone] == STAND_IN_GREY).all()
    assert data.skipped[0][0] == str(paths[1]) and str(paths[1]) in caplog.text


def test_deep_check_lists_a_corrupt_body_the_scan_passes(tmp_path, capsys):
    from datasets.imagefolder import main as imagefolder_main

    _folder(tmp_path, count=3)
    broken = tmp_path / "class_0" / "broken.JPEG"
    _corrupt_body_jpeg(broken)
    (tmp_path / "class_1" / "empty.JPEG").write_bytes(b"")
    assert str(broken) not in [path for path, _ in scan_image_folder(tmp_path).bad_files]
    assert imagefolder_main(["--deep-check", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert sorted(line.split(": ")[0] for line in out.out.splitlines()) == sorted(
        [str(broken), str(tmp_path / "class_1" / "empty.JPEG")])
    assert "2 file(s)" in out.err
    broken.unlink()
    (tmp_path / "class_1" / "empty.JPEG").unlink()
    assert imagefolder_main(["--deep-check", str(tmp_path)]) == 0


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir() and "FASHION_MNIST_DIR" not in os.environ,
                    reason="Fashion-MNIST not installed")
def test_built_in_evaluation_splits_print_their_counts(capsys):
    from evaluation.data import eval_splits

    train, test = eval_splits("fashion-mnist", None, 100, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval ")]
    assert len(lines) == 2 and lines[0].startswith(f"eval train: {len(train)} of 60,000 images in 10 classes")
    assert lines[1].startswith(f"eval test: {len(test):,} images in 10 classes of Fashion-MNIST test")


def test_open_rgb_min_side_decodes_a_large_jpeg_smaller_but_not_below_it(tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(_pixels(11, (400, 640, 3))).save(path, quality=90)
    assert open_rgb(path).size == (640, 400)
    assert open_rgb(path, min_side=150).size == (160, 100)  # 1/4 scale: the smallest with a side >= 150


@pytest.mark.parametrize(("make", "message"), [
    (lambda data: data[: len(data) // 2], "is not a complete gzip file"),
    (lambda data: b"not gzip at all", "is not a complete gzip file"),
    (lambda data: gzip.compress(b"\x00\x00"), "is truncated: 2 bytes"),
])
def test_damaged_fashion_mnist_file_is_one_clear_error(tmp_path, make, message):
    from datasets.fashion_mnist import load_fashion_mnist

    images = gzip.compress(np.array([0x0803, 1, 2, 2], ">u4").tobytes() + bytes(4))
    labels = gzip.compress(np.array([0x0801, 1], ">u4").tobytes() + bytes(1))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(labels)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    assert load_fashion_mnist("test", tmp_path)[0].shape == (1, 2, 2)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(make(images))
    with pytest.raises(ValueError, match=f"t10k-images-idx3-ubyte.gz {message}"):
        load_fashion_mnist("test", tmp_path)
