"""The files a real ImageFolder holds besides clean JPEGs: odd ones every loader must keep, and
unreadable ones every loader must skip (and report). The `dirty_corpus` fixture adds them to a
copy of a photo corpus."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

ODD_BUT_VALID = ("grayscale.JPEG", "cmyk.JPEG", "png_named.JPEG", "progressive.JPEG")
UNREADABLE = ("zero_byte.JPEG", "truncated.JPEG", "not_an_image.JPEG")


def write_bad_files(class_dir: Path, sample: Image.Image) -> None:
    """Write ODD_BUT_VALID (made from `sample`) and UNREADABLE into `class_dir`."""
    sample.convert("L").save(class_dir / "grayscale.JPEG", format="JPEG", quality=90)
    sample.convert("CMYK").save(class_dir / "cmyk.JPEG", format="JPEG", quality=90)
    sample.save(class_dir / "png_named.JPEG", format="PNG")
    sample.save(class_dir / "progressive.JPEG", format="JPEG", quality=90, progressive=True)
    (class_dir / "zero_byte.JPEG").write_bytes(b"")
    good = io.BytesIO()
    sample.save(good, format="JPEG", quality=90)
    (class_dir / "truncated.JPEG").write_bytes(good.getvalue()[: good.tell() // 3])
    (class_dir / "not_an_image.JPEG").write_text("this is a text file with an image name\n")
