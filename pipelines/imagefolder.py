"""ImageFolder scanning (root/class/image) and the bad-file policy shared by every loader.

Policy: files that cannot be decoded (zero-byte, truncated, not an image) are found by a pre-scan,
left out of the sample list, counted and reported with their paths. Images that decode but are
unusual (grayscale, CMYK, PNG named .JPEG, progressive JPEG) are kept: every loader decodes them
to RGB.

The pre-scan reads only each file's head and tail (two small reads), in a thread pool, so it stays
fast on ImageNet-size folders: JPEG and PNG files must start with their signature and end with their
end marker (JPEG EOI 0xFFD9, PNG IEND), which catches empty, truncated and non-image files without
decoding. Other formats are checked by PIL's header parser and `verify()`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND"
# Encoders and cameras may append padding or metadata after the end marker; look this far back for it.
TAIL_BYTES = 4096


@dataclass
class ImageFolderIndex:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index), sorted by path
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def report(self) -> str:
        if not self.bad_files:
            return f"{len(self.samples)} images in {len(self.classes)} classes under {self.root}"
        lines = [f"{len(self.samples)} images in {len(self.classes)} classes under {self.root}; "
                 f"skipped {len(self.bad_files)} unreadable file(s):"]
        lines += [f"  {path}: {reason}" for path, reason in self.bad_files]
        return "\n".join(lines)


def check_image_file(path: str) -> str | None:
    """Return why `path` cannot be decoded, or None if it looks like a complete image."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    if head.startswith(JPEG_SOI):
        return None if JPEG_EOI in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(PNG_SIGNATURE):
        return None if PNG_IEND in tail else "truncated PNG (no IEND chunk)"
    return _check_with_pil(path)


def _check_with_pil(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.verify()
    except UnidentifiedImageError:
        return "not an image (unknown format)"
    except (OSError, SyntaxError, ValueError) as err:
        return f"corrupt image ({err})"
    return None


def find_unreadable(paths: list[str], workers: int = 16) -> list[tuple[str, str]]:
    """(path, reason) for every file in `paths` that cannot be decoded, in input order.

    Threads suit this: the work is small reads that release the GIL.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = pool.map(check_image_file, paths, chunksize=256)
        return [(path, reason) for path, reason in zip(paths, reasons, strict=True) if reason is not None]


def scan_image_folder(root: str | os.PathLike, *, validate: bool = True) -> ImageFolderIndex:
    """List root/<class>/<image> files; raise ValueError with a clear message for bad roots.

    With `validate` (the default), files that cannot be decoded are moved from `samples` to
    `bad_files`; see the module docstring for the check.
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected an ImageFolder tree root/<class>/<image>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected root/<class>/<image>")
    samples = []
    for index, name in enumerate(classes):
        for dirpath, _, files in os.walk(root / name, followlinks=True):
            for fname in files:
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), index))
    if not samples:
        raise ValueError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    samples.sort()
    bad_files = find_unreadable([path for path, _ in samples]) if validate else []
    if bad_files:
        bad = {path for path, _ in bad_files}
        samples = [sample for sample in samples if sample[0] not in bad]
    if not samples:
        raise ValueError(f"{root}: none of the {len(bad_files)} image files can be decoded, e.g. "
                         f"{bad_files[0][0]}: {bad_files[0][1]}")
    return ImageFolderIndex(root=root, classes=classes, samples=samples, bad_files=bad_files)


def load_index(root: str | os.PathLike) -> ImageFolderIndex:
    """Scan and validate `root`, logging the skipped files with their paths (one warning)."""
    index = scan_image_folder(root)
    if index.bad_files:
        log.warning("%s", index.report())
    return index
