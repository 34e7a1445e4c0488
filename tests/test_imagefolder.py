"""The ImageFolder reader (datasources/imagefolder.py): the scan and its pre-scan for files that cannot be
decoded, the real format read from the magic bytes, symlink loops, the start-up line, open_rgb's
pixels (the same as DALI's decoder) and its reduced-size decode, and the --deep-check command."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from bad_files import ODD_BUT_VALID, UNREADABLE
from image_files import corrupt_body_jpeg, gray16_png, misnamed_folder, pixels, png_folder
from PIL import Image

from datasources.imagefolder import check_image_file, load_index, open_rgb, scan_image_folder


def _photo(photo_corpus: str) -> bytes:
    return sorted(Path(photo_corpus).rglob("*.JPEG"))[0].read_bytes()


@pytest.mark.timeout(60)
def test_dirty_corpus_reports_exactly_the_unreadable_files(dirty_corpus):
    index = scan_image_folder(dirty_corpus)
    assert sorted(os.path.basename(path) for path, _ in index.bad_files) == sorted(UNREADABLE)
    kept = {os.path.basename(path) for path, _ in index.samples}
    assert set(ODD_BUT_VALID) <= kept and not kept & set(UNREADABLE)
    assert len(index.samples) == 32 + len(ODD_BUT_VALID)
    report = index.report()
    assert f"skipped {len(UNREADABLE)} unreadable file(s)" in report
    assert all(path in report for path, _ in index.bad_files)


@pytest.mark.timeout(60)
def test_every_kept_file_decodes_and_every_skipped_file_does_not(dirty_corpus):
    """PIL's full decode is the independent reference for the fast head/tail check."""
    index = scan_image_folder(dirty_corpus)

    def decodes(path: str) -> bool:
        try:
            with Image.open(path) as img:
                img.convert("RGB").load()
        except (OSError, SyntaxError):
            return False
        return True

    assert all(decodes(path) for path, _ in index.samples)
    assert not any(decodes(path) for path, _ in index.bad_files)


@pytest.mark.parametrize(("name", "reason"), [
    ("zero_byte.JPEG", "empty file"), ("truncated.JPEG", "truncated JPEG"), ("not_an_image.JPEG", "not an image"),
])
def test_reasons_name_the_problem(dirty_corpus, name, reason):
    assert reason in check_image_file(os.path.join(dirty_corpus, "class_000", name))


def test_jpeg_with_trailing_bytes_after_end_marker_is_kept(photo_corpus, tmp_path):
    path = tmp_path / "padded.JPEG"
    path.write_bytes(_photo(photo_corpus) + b"\x00" * 300)
    assert check_image_file(str(path)) is None


def test_truncated_png_is_skipped(photo_corpus, tmp_path):
    buf = io.BytesIO()
    Image.open(io.BytesIO(_photo(photo_corpus))).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated PNG" in check_image_file(str(path))


def test_other_formats_are_checked_by_pil(photo_corpus, tmp_path):
    good, cut = tmp_path / "good.bmp", tmp_path / "cut.bmp"
    Image.open(io.BytesIO(_photo(photo_corpus))).save(good, format="BMP")
    cut.write_bytes(good.read_bytes()[:40])
    assert check_image_file(str(good)) is None
    assert check_image_file(str(cut)) is not None


def test_validation_can_be_turned_off(dirty_corpus):
    index = scan_image_folder(dirty_corpus, validate=False)
    assert not index.bad_files and len(index.samples) == 32 + len(ODD_BUT_VALID) + len(UNREADABLE)


def test_folder_of_only_unreadable_files_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 image files can be decoded.*x.JPEG: empty file"):
        scan_image_folder(tmp_path)


def test_load_index_logs_one_warning_with_the_paths(dirty_corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="datasources.imagefolder"):
        index = load_index(dirty_corpus)
    assert len(caplog.records) == 1
    assert all(path in caplog.records[0].getMessage() for path, _ in index.bad_files)


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: (root / "f").write_text("x") and root / "f", "is not a folder"),
    (lambda root: root, "no class sub-folders"),
])
def test_bad_roots_are_clear_errors(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        scan_image_folder(make(tmp_path))


# ---------------------------------------------------------------- the real format behind the name


def test_scan_records_the_real_format_from_the_magic_bytes(tmp_path):
    files = misnamed_folder(tmp_path)
    index = scan_image_folder(tmp_path)
    assert {kind: index.format_of(str(path)) for kind, path in files.items()} == {k: k for k in files}
    assert index.format_of(str(tmp_path / "class_0" / "img_0.png")) == "PNG"


# ---------------------------------------------------------------- symlink loops and the start-up count


def test_symlink_loop_is_scanned_once_and_reported(tmp_path, caplog, capsys):
    png_folder(tmp_path, count=6)
    os.symlink("..", tmp_path / "class_0" / "loop")  # class_0/loop/class_0/loop/... : 40 levels before ELOOP
    os.symlink(tmp_path / "class_1", tmp_path / "class_0" / "again")
    with caplog.at_level(logging.WARNING, logger="datasources.imagefolder"):
        index = load_index(tmp_path)
    assert len(index.samples) == 6
    assert [label for _, label in index.samples].count(0) == 3
    assert "loop" in caplog.text and "again" in caplog.text and "counted once" in caplog.text
    assert "data: 6 images in 2 classes" in capsys.readouterr().err


def test_start_up_line_counts_images_classes_and_skipped_files(tmp_path, capsys):
    png_folder(tmp_path, count=5)
    (tmp_path / "class_0" / "empty.JPEG").write_bytes(b"")
    load_index(tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data:")]
    assert lines == [f"data: 5 images in 2 classes under {tmp_path} (1 skipped, listed above)"]


def test_start_up_line_only_on_rank_0(tmp_path, capsys, monkeypatch):
    png_folder(tmp_path, count=2)
    monkeypatch.setenv("RANK", "1")
    load_index(tmp_path)
    assert "data:" not in capsys.readouterr().err


# ---------------------------------------------------------------- the same pixels on every decode path


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL writes 16-bit only for grayscale)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    image = Image.fromarray(pixels(3, (24, 40, 3)))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif, quality=95)


# (file maker, largest allowed difference in 8-bit levels): PIL keeps only the high byte of 16-bit RGB
# (DALI rounds), so one level there; the others are the same libjpeg-turbo / zlib decode, so exact.
PIXEL_CASES = {
    "exif_rotated.jpg": (_exif_rotated_jpeg, 0),
    "gray16.png": (gray16_png, 0),
    "rgb16.png": (lambda path: _png16(path, np.random.default_rng(4).integers(0, 65536, (24, 40, 3))), 1),
    "palette.png": (lambda path: Image.fromarray(pixels(5)).convert("P").save(path), 0),
    "gray_alpha.png": (lambda path: Image.fromarray(pixels(6)).convert("LA").save(path), 0),
    "cmyk.jpg": (lambda path: Image.fromarray(pixels(8)).convert("CMYK").save(path, quality=95), 0),
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


def test_open_rgb_min_side_decodes_a_large_jpeg_smaller_but_not_below_it(tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels(11, (400, 640, 3))).save(path, quality=90)
    assert open_rgb(path).size == (640, 400)
    assert open_rgb(path, min_side=150).size == (160, 100)  # 1/4 scale: the smallest with a side >= 150


# ---------------------------------------------------------------- --deep-check


def test_deep_check_lists_a_corrupt_body_the_scan_passes(tmp_path, capsys):
    from datasources.imagefolder import main as imagefolder_main

    png_folder(tmp_path, count=3)
    broken = tmp_path / "class_0" / "broken.JPEG"
    corrupt_body_jpeg(broken)
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
