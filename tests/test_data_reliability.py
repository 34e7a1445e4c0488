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
