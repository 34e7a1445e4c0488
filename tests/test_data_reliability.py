"""Data that changes or lies: files that vanish or break after the scan, formats behind a wrong name,
symlink loops, and pixels that must be the same on every decode path (issue #14)."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.base import LoaderConfig
from pipelines.imagefolder import load_index, open_rgb, scan_image_folder
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
    from pipelines.torchvision import build_loader

    paths = _folder(tmp_path)
    broken = tmp_path / "class_1" / "broken.JPEG"
    _corrupt_body_jpeg(broken)
    loader = build_loader(LoaderConfig(str(tmp_path), batch_size=4, workers=workers, drop_last=False,
                                       recipe=BYOL_VIEWS.with_overrides(res=RES)))
    assert len(loader.index.samples) == 7  # the scan cannot see either problem
    paths[2].unlink()
    with caplog.at_level(logging.WARNING, logger="pipelines.imagefolder"):
        seen = sum(labels.numel() for _, _, labels in loader)
    assert seen == 5
    assert sorted(path for path, _ in loader.skipped) == sorted([str(paths[2]), str(broken)])
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert str(paths[2]) in messages and "no longer exists" in messages
    assert str(broken) in messages and "cannot decode" in messages


def _dali_loader(root: Path, **overrides):
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from pipelines.dali import build_loader

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
    with caplog.at_level(logging.WARNING, logger="pipelines.imagefolder"):
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
    with caplog.at_level(logging.WARNING, logger="pipelines.imagefolder"):
        total = sum(labels.numel() for _, _, labels in loader)
    assert total > 0 and sorted(path for path, _ in loader.skipped) == sorted(map(str, paths[40:]))
    assert "GIF file, which DALI cannot decode" in loader.skipped[0][1]


@pytest.mark.timeout(60)
def test_dali_failure_with_no_file_to_blame_is_one_clear_error(tmp_path, monkeypatch):
    import pipelines.dali as dali

    _folder(tmp_path)
    loader = _dali_loader(tmp_path)

    def failing():
        raise RuntimeError("Critical error in pipeline:\nencountered:\nnvImageCodec failure: '#4'\n")
        yield

    monkeypatch.setattr(loader, "_iterator", failing())
    with pytest.raises(dali.DaliLoaderError, match=r"nvImageCodec failure: '#4'; no file of it .*--loader torchvision"):
        next(iter(loader))
