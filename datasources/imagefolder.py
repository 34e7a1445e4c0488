"""ImageFolder scanning (root/class/image), the bad-file policy and the one RGB decode shared by every loader.

Policy: files that cannot be decoded (zero-byte, truncated, not an image) are found by a pre-scan,
left out of the sample list, counted and reported with their paths. Images that decode but are
unusual (grayscale, CMYK, 16-bit, palette, PNG/GIF/WebP named .JPEG, progressive JPEG) are kept:
every loader decodes them to the same RGB pixels (`open_rgb` on the PIL paths; a loader whose decoder
cannot read a format, e.g. DALI and GIF, leaves those files out with a warning naming them). A file that
vanishes or fails to decode during the run is skipped by the loader with a warning naming it.

The pre-scan reads only each file's head and tail (two small reads), in a thread pool, so it stays
fast on ImageNet-size folders: the real format comes from the file's magic bytes (not its name), and
JPEG and PNG files must end with their end marker (JPEG EOI 0xFFD9, PNG IEND), which catches empty,
truncated and non-image files without decoding. Other formats are checked by PIL's header parser and
`verify()`. Folders are walked following symlinks, each real folder once: a symlink loop or a second
link to a folder already scanned is reported, not counted again.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND"
HEAD_BYTES = 16
# Encoders and cameras may append padding or metadata after the end marker; look this far back for it.
TAIL_BYTES = 4096
# Magic bytes -> format name (the name PIL reports), checked in order.
MAGIC = (
    (JPEG_SOI, "JPEG"), (PNG_SIGNATURE, "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


@dataclass
class ImageFolderIndex:
    """The samples of an ImageFolder tree root/<class>/<image> (`scan_image_folder`), shared by every loader.

    Attributes
    ----------
    root: the folder scanned.
    classes: the class folder names, sorted; a sample's class index is its folder's position here.
    samples, bad_files, formats, links: see the comments below.
    """

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index), sorted by path
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # Real format (from the magic bytes) of every kept sample that is not a JPEG; JPEG is the default,
    # so an ImageNet-size index holds no per-file entry here.
    formats: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)  # symlinked folders seen twice (loops, duplicates)

    def report(self) -> str:
        if not self.bad_files:
            return f"{len(self.samples)} images in {len(self.classes)} classes under {self.root}"
        lines = [f"{len(self.samples)} images in {len(self.classes)} classes under {self.root}; "
                 f"skipped {len(self.bad_files)} unreadable file(s):"]
        lines += [f"  {path}: {reason}" for path, reason in self.bad_files]
        return "\n".join(lines)

    def summary(self, role: str = "data") -> str:
        """One start-up line: what the run reads (as `role`), and how much was left out."""
        skipped = f" ({len(self.bad_files):,} skipped, listed above)" if self.bad_files else ""
        return f"{role}: {len(self.samples):,} images in {len(self.classes):,} classes under {self.root}{skipped}"

    def format_of(self, path: str) -> str:
        return self.formats.get(path, "JPEG")

    def readable_by(self, decoder: str, formats: Collection[str]) -> ImageFolderIndex:
        """This index without the samples whose real format `decoder` cannot decode (moved to `bad_files`).

        Parameters
        ----------
        decoder: the loader's name as the skip reason shows it (e.g. 'DALI').
        formats: the formats it decodes, as `sniff_format` names them ('JPEG', 'PNG', ...).
        """
        dropped = [(path, f"{kind} image{_misnamed(path, kind)}: {decoder} cannot decode {kind}; "
                          "--loader torchvision reads it")
                   for path, kind in self.formats.items() if kind not in formats]
        return self.without(sorted(dropped)) if dropped else self

    def without(self, dropped: list[tuple[str, str]]) -> ImageFolderIndex:
        """This index with the (path, reason) files moved from `samples` to `bad_files`."""
        paths = {path for path, _ in dropped}
        return replace(self, samples=[s for s in self.samples if s[0] not in paths],
                       bad_files=[*self.bad_files, *dropped],
                       formats={p: f for p, f in self.formats.items() if p not in paths})


def _misnamed(path: str, kind: str) -> str:
    """' named .JPEG' where the file's name claims another format than its bytes, else ''."""
    suffix = os.path.splitext(path)[1]
    same = {"JPEG": (".jpg", ".jpeg"), "TIFF": (".tif", ".tiff")}.get(kind, (f".{kind.lower()}",))
    return "" if suffix.lower() in same else f" named {suffix}"


def sniff_format(head: bytes) -> str | None:
    """The image format `head` (a file's first bytes) starts with, or None if no known signature."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in MAGIC if head.startswith(magic)), None)


def inspect_image_file(path: str) -> tuple[str | None, str | None]:
    """(real format, None) for a file that looks like a complete image, else (format or None, why not)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return None, "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError as err:
        return None, f"cannot read: {err.strerror or err}"
    kind = sniff_format(head)
    if kind == "JPEG":
        return kind, None if JPEG_EOI in tail else "truncated JPEG (no end-of-image marker)"
    if kind == "PNG":
        return kind, None if PNG_IEND in tail else "truncated PNG (no IEND chunk)"
    return _check_with_pil(path)


def check_image_file(path: str) -> str | None:
    """Return why `path` cannot be decoded, or None if it looks like a complete image."""
    return inspect_image_file(path)[1]


def _check_with_pil(path: str) -> tuple[str | None, str | None]:
    try:
        with Image.open(path) as img:
            kind = img.format
            img.verify()
    except UnidentifiedImageError:
        return None, "not an image (unknown format)"
    except (OSError, SyntaxError, ValueError) as err:
        return None, f"corrupt image ({err})"
    return kind, None


def open_rgb(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """The file decoded to 8-bit RGB the same way on every PIL path (and as DALI's decoder does):
    EXIF orientation applied, 16-bit and 32-bit samples scaled to 8 bits (PIL's own conversion clips
    them, so a 16-bit PNG came out white), palette, gray, LA, CMYK converted to RGB (alpha dropped).

    Parameters
    ----------
    path: the image file; PIL's errors (DECODE_ERRORS) propagate (`read_rgb` catches them).
    min_side: a JPEG may decode at 1/2..1/8 scale (DCT scaling, PIL's `draft`) as long as its longer
        side stays at least this (a converter that stores images at most this large); None: full size.
    """
    with Image.open(path) as img:
        if min_side is not None and max(img.size) > min_side:
            scale = min_side / max(img.size)
            img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = Image.fromarray(_to_uint8(np.asarray(img), 65535), mode="L")
        elif img.mode == "F":
            img = Image.fromarray(_to_uint8(np.asarray(img), 1.0), mode="L")
        return img.convert("RGB")


def _to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float64) * (255 / full_scale)), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Unreadable:
    """A sample that failed to load during the run, after the scan passed it (deleted, corrupt body)."""

    path: str
    reason: str


# What PIL raises for a missing, unreadable or corrupt file (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_rgb(path: str) -> Image.Image | Unreadable:
    """`open_rgb(path)`, or what went wrong: loaders skip such a sample instead of stopping the run."""
    try:
        return open_rgb(path)
    except FileNotFoundError:
        return Unreadable(path, "the file no longer exists (deleted after the scan)")
    except DECODE_ERRORS as err:
        return Unreadable(path, f"cannot decode ({err})")


class SkipLog:
    """Files a loader skipped during the run (`skipped`: (path, reason)), each warned about once by name."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def add(self, item: Unreadable) -> None:
        self.skipped.append((item.path, item.reason))
        log.warning("skipped %s: %s; %d file(s) skipped during this run so far", item.path, item.reason,
                    len(self.skipped))


def inspect_files(paths: list[str], workers: int = 16) -> list[tuple[str | None, str | None]]:
    """`inspect_image_file` of every path, in input order. Threads suit this: small reads release the GIL.

    Each result is (format, reason): the format `sniff_format` found, and why the file is unreadable
    (None when it is readable). `workers`: threads (at least 1 is used).
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(inspect_image_file, paths, chunksize=256))


def find_unreadable(paths: list[str], workers: int = 16) -> list[tuple[str, str]]:
    """(path, reason) for every file in `paths` that cannot be decoded, in input order."""
    results = inspect_files(paths, workers)
    return [(path, reason) for path, (_, reason) in zip(paths, results, strict=True) if reason is not None]


def _walk_once(top: Path, seen: dict[tuple[int, int], str], links: list[str]) -> list[str]:
    """Image files under `top`, following symlinks but entering each real folder once: `seen` maps
    (st_dev, st_ino) of every folder entered (and of the root and every class folder, entered as
    themselves only) to its path; a folder met again is noted in `links`."""
    found = []
    pending = [str(top)]
    while pending:
        folder = pending.pop()
        try:
            stat = os.stat(folder)
        except OSError as err:
            links.append(f"{folder}: cannot enter ({err.strerror or err})")
            continue
        key = (stat.st_dev, stat.st_ino)
        if key in seen and seen[key] != folder:
            links.append(f"{folder} is the folder {seen[key]} again (symlink); its images are counted once")
            continue
        seen[key] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            links.append(f"{folder}: cannot list ({err.strerror or err})")
            continue
        for entry in entries:
            if entry.is_dir():  # follows symlinks
                pending.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(entry.path)
    return found


def _folder_key(folder: Path) -> tuple[int, int]:
    stat = os.stat(folder)
    return stat.st_dev, stat.st_ino


def scan_image_folder(root: str | os.PathLike, *, validate: bool = True) -> ImageFolderIndex:
    """List root/<class>/<image> files; raise ValueError with a clear message for bad roots.

    With `validate` (the default), files that cannot be decoded are moved from `samples` to
    `bad_files`; see the module docstring for the check.

    Parameters
    ----------
    root: the ImageFolder root; its sub-folders not starting with '.' are the classes.
    validate: check every file's header (16 threads) and record non-JPEG formats in `formats`; False
        only lists the files (no `bad_files`, no `formats`: every sample counts as a JPEG).
    """
    root = Path(root)
    if not root.exists():
        raise ValueError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; expected an ImageFolder tree root/<class>/<image>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected root/<class>/<image>")
    # A link from inside a class to the root or another class would relabel that class's images.
    seen = {_folder_key(folder): str(folder) for folder in (root, *(root / name for name in classes))}
    links: list[str] = []
    samples = [(path, index) for index, name in enumerate(classes) for path in _walk_once(root / name, seen, links)]
    if not samples:
        raise ValueError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    samples.sort()
    if not validate:
        return ImageFolderIndex(root=root, classes=classes, samples=samples, links=links)
    results = inspect_files([path for path, _ in samples])
    bad_files = [(path, reason) for (path, _), (_, reason) in zip(samples, results, strict=True) if reason]
    formats = {path: kind for (path, _), (kind, reason) in zip(samples, results, strict=True)
               if not reason and kind != "JPEG"}
    if bad_files:
        bad = {path for path, _ in bad_files}
        samples = [sample for sample in samples if sample[0] not in bad]
    if not samples:
        raise ValueError(f"{root}: none of the {len(bad_files)} image files can be decoded, e.g. "
                         f"{bad_files[0][0]}: {bad_files[0][1]}")
    return ImageFolderIndex(root=root, classes=classes, samples=samples, bad_files=bad_files, formats=formats,
                            links=links)


def is_main_process() -> bool:
    """Rank 0 of a launched world (RANK, set by train.py's launcher and torchrun), or a lone process."""
    return os.environ.get("RANK", "0") == "0"


def announce(line: str) -> None:
    """A start-up line about the data (stderr, beside the warnings it refers to), from the main process only."""
    if is_main_process():
        print(line, file=sys.stderr, flush=True)


def load_index(root: str | os.PathLike, decoder: tuple[str, Collection[str]] | None = None,
               role: str = "data") -> ImageFolderIndex:
    """Scan and validate `root`; on the main process, warn about skipped files and symlinked folders
    seen twice (one warning each, with their paths) and print the one-line `summary`.

    Parameters
    ----------
    root: the ImageFolder root (`scan_image_folder`; ValueError for a bad one).
    decoder: (name, the formats it decodes) of a loader that cannot read every format PIL can: the
        other files are skipped and listed with the unreadable ones (`ImageFolderIndex.readable_by`).
    role: which split it is in the summary line, e.g. 'data' for training, 'eval train' for the
        evaluation's own read of a folder.
    """
    index = scan_image_folder(root)
    if decoder is not None:
        index = index.readable_by(*decoder)
    if is_main_process():
        if index.links:
            log.warning("%s: symlinked folders met more than once (a loop or a second link), scanned once:\n%s",
                        index.root, "\n".join(f"  {line}" for line in index.links))
        if index.bad_files:
            log.warning("%s", index.report())
    announce(index.summary(role))
    return index


def decode_check(path: str) -> str | None:
    """Why `path` fails a full decode of its entropy-coded data, or None. JPEGs decode at 1/8 scale
    (PIL's `draft`: libjpeg still reads every coefficient, but skips most of the inverse DCT), so this
    finds corrupt bodies behind intact markers at a fraction of a full decode's cost."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except DECODE_ERRORS as err:
        return f"cannot decode ({err})"
    return None


def find_undecodable(paths: list[str], workers: int = os.cpu_count() or 1) -> list[tuple[str, str]]:
    """(path, reason) of every file in `paths` that fails `decode_check`, in input order; `workers` threads."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL releases the GIL while decoding
        reasons = pool.map(decode_check, paths, chunksize=64)
        return [(path, why) for path, why in zip(paths, reasons, strict=True) if why]


def deep_check(root: str | os.PathLike, workers: int = os.cpu_count() or 1) -> list[tuple[str, str]]:
    """(path, reason) of every file of the folder that fails the scan or a full (1/8-scale) decode."""
    index = scan_image_folder(root)
    return index.bad_files + find_undecodable([path for path, _ in index.samples], workers)


def main(argv: list[str] | None = None) -> int:
    """`python -m datasources.imagefolder --deep-check ROOT`: list the files no loader can decode."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m datasources.imagefolder", description=main.__doc__)
    parser.add_argument("--deep-check", required=True, metavar="ROOT", help="ImageFolder root to decode in full")
    args = parser.parse_args(argv)
    try:
        bad = deep_check(args.deep_check)
    except ValueError as err:
        print(f"imagefolder: error: {err}", file=sys.stderr)
        return 2
    for path, reason in bad:
        print(f"{path}: {reason}")
    print(f"{len(bad)} file(s) under {args.deep_check} cannot be decoded"
          + ("; move them out of the folder" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
