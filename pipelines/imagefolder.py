"""ImageFolder scanning (root/class/image) and the bad-file policy shared by every loader.

Policy: files that cannot be decoded (zero-byte, truncated, not an image) are found by a pre-scan,
left out of the sample list, counted and reported with their paths. Images that decode but are
unusual (grayscale, CMYK, PNG named .JPEG, progressive JPEG) are kept: every loader decodes them
to RGB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


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


def scan_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """List root/<class>/<image> files; raise ValueError with a clear message for bad roots."""
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
    return ImageFolderIndex(root=root, classes=classes, samples=samples)
