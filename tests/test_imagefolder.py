"""The ImageFolder scan and its pre-scan for files that cannot be decoded."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
from bad_files import ODD_BUT_VALID, UNREADABLE
from PIL import Image

from datasets.imagefolder import check_image_file, load_index, scan_image_folder


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
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
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
