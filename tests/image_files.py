"""Small image files that the ImageFolder, loader and evaluation-set tests write: random pixels, a folder
of PNGs, a JPEG whose body is corrupt behind intact markers, files whose real format is not the one
their name says, and a 16-bit grayscale PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pixels(seed: int, shape: tuple[int, ...] = (24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_folder(root: Path, count: int = 6, classes: int = 2) -> list[Path]:
    """`count` small PNGs spread over `classes` class folders."""
    paths = []
    for i in range(count):
        path = root / f"class_{i % classes}" / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels(i)).save(path)
        paths.append(path)
    return paths


def corrupt_body_jpeg(path: Path) -> None:
    """A JPEG with intact SOI/EOI markers (the scan passes it) but a second frame header inside its
    entropy-coded data, which libjpeg (PIL) rejects: 'broken data stream'."""
    Image.fromarray(pixels(7, (64, 64, 3))).save(path, quality=90)
    data = bytearray(path.read_bytes())
    body = data.index(b"\xff\xda") + 40
    data[body:body + 2] = b"\xff\xc0"
    path.write_bytes(bytes(data))


def misnamed_folder(root: Path) -> dict[str, Path]:
    """A folder with a palette GIF, a WebP and a PNG all named .JPEG, beside plain PNGs."""
    png_folder(root, count=4)
    files = {kind: root / "class_0" / f"{kind.lower()}_named.JPEG" for kind in ("GIF", "WEBP", "PNG")}
    for kind, path in files.items():
        Image.fromarray(pixels(9)).convert("P" if kind == "GIF" else "RGB").save(path, format=kind)
    return files


def gray16_png(path: Path) -> None:
    Image.fromarray(np.linspace(0, 65535, 24 * 40).reshape(24, 40).astype(np.uint16)).save(path)


def class_folders(root: Path, names: list[str], per_class: int = 3) -> str:
    """Class folders of flat-colour 16x16 PNGs whose colour is set by the class name's position in sorted `names`."""
    for label, name in enumerate(sorted(names)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (200 * (label % 2), 100 * (label // 2), 20 * i)).save(root / name / f"{i}.png")
    return str(root)
