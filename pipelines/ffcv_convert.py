"""Convert an ImageFolder tree or the built-in Fashion-MNIST to an FFCV .beton file (image + label).

    python -m pipelines.ffcv_convert --src data/imagenet/train --out train.beton
    python -m pipelines.ffcv_convert --src fashion-mnist --split train --out fmnist.beton

Write modes (ffcv's RGBImageField): 'jpg' stores JPEG (re-encoded at --jpeg-quality), 'raw' stores
pixels (ffcv ignores --jpeg-quality there), 'smart' stores JPEG only for images whose raw size
exceeds --smart-threshold bytes, 'proportion' JPEG-encodes a random --compress-prob share.
Defaults: 'jpg' for folders (the loader's job is decoding JPEGs fast); 'raw' for Fashion-MNIST,
whose 28x28 images (stored as 3-channel RGB, 2.3 KB each) gain nothing from JPEG but its loss
and decode cost.

Unreadable files are found by the ImageFolder pre-scan, skipped and listed. The output appears
atomically: the writer fills a hidden temp file next to --out that is renamed into place only
when complete and removed on any failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import Process
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipelines.fashion_mnist import load_fashion_mnist
from pipelines.imagefolder import scan_image_folder

FASHION_MNIST = "fashion-mnist"
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# 'smart' with ffcv's default threshold (None) silently stores everything raw; 256x256 RGB is the
# size above which JPEG pays off on ImageNet-like images.
DEFAULT_SMART_THRESHOLD = 256 * 256 * 3
DEFAULT_JPEG_QUALITY = 90
DEFAULT_MAX_RES = 512


class ConversionError(RuntimeError):
    """The conversion failed; the message says why and no output file was left behind."""


class FolderImages:
    """Indexable (RGB uint8 array, label) view of ImageFolder samples, decoded in the writer's workers."""

    def __init__(self, samples: Sequence[tuple[str, int]], max_res: int | None) -> None:
        self.samples = list(samples)
        self.max_res = max_res

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            if self.max_res is not None:
                # JPEG DCT scaling decodes large files at 1/2..1/8 size directly (never below
                # max_res); ffcv's writer then does the exact area resize.
                scale = self.max_res / max(img.size)
                img.draft("RGB", (int(np.ceil(img.width * scale)), int(np.ceil(img.height * scale))))
            return np.asarray(img.convert("RGB")), label


class GrayImages:
    """Indexable (RGB uint8 array, label) view of grayscale arrays (N, H, W): channels repeated."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.repeat(self.images[index][:, :, None], 3, axis=2), int(self.labels[index])


@dataclass
class Source:
    dataset: FolderImages | GrayImages
    classes: int
    bad_files: list[tuple[str, str]]
    default_mode: str


def evenly_spaced(total: int, limit: int | None) -> np.ndarray:
    """Indices of `limit` samples spread evenly over `total` (all classes of a sorted folder)."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, limit).round().astype(np.int64))


def load_source(src: str, split: str, max_res: int | None, limit: int | None) -> Source:
    if src == FASHION_MNIST:
        images, labels = load_fashion_mnist(split)
        keep = evenly_spaced(len(images), limit)
        return Source(GrayImages(images[keep], labels[keep]), 10, [], "raw")
    index = scan_image_folder(src)
    samples = [index.samples[i] for i in evenly_spaced(len(index.samples), limit)]
    return Source(FolderImages(samples, max_res), len(index.classes), index.bad_files, "jpg")


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} images/s" if task.speed else "- images/s", style="progress.data.speed")


class _WriterHooks:
    """Stand-ins for ffcv.writer's tqdm, Process and sleep while one conversion runs.

    ffcv's writer shows a tqdm bar and waits for its worker processes by polling a shared counter
    forever: a worker that dies (an image that fails to decode) would hang it. The hooks show a rich
    bar instead and turn a dead worker into a ConversionError.
    """

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description
        self.workers: list[Process] = []
        self.task = None

    def tqdm(self, total: int) -> _WriterHooks:
        self.task = self.progress.add_task(self.description, total=total)
        return self

    def update(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def close(self) -> None:
        self.progress.refresh()

    def process(self, *args, **kwargs) -> Process:
        worker = Process(*args, **kwargs)
        self.workers.append(worker)
        return worker

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        failed = [w for w in self.workers if w.exitcode not in (None, 0)]
        if failed:
            raise ConversionError(
                f"a writer worker exited with code {failed[0].exitcode} (its traceback is "
                "above); fix or remove that file and run again"
            )

    def stop_workers(self) -> None:
        """Kill the workers still running: they append to the output file by name."""
        for worker in self.workers:
            if worker.is_alive():
                worker.kill()
            worker.join()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import ffcv.writer

        saved = {name: getattr(ffcv.writer, name) for name in ("tqdm", "Process", "sleep")}
        ffcv.writer.tqdm, ffcv.writer.Process, ffcv.writer.sleep = self.tqdm, self.process, self.sleep
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(ffcv.writer, name, value)


def new_progress(console: Console | None = None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _release_shared_memory(writer) -> None:
    shm = getattr(writer, "metadata_sm", None)
    if shm is not None and not isinstance(shm, int):  # ffcv sets a placeholder int before creating it
        with contextlib.suppress(Exception):
            shm.close()
            shm.unlink()


def write_beton(dataset, out: str | os.PathLike, image_field, workers: int, progress: Progress) -> None:
    """Write (image, label) samples of `dataset` to `out` atomically (temp file + os.replace)."""
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    writer = DatasetWriter(tmp, {"image": image_field, "label": IntField()}, num_workers=workers)
    hooks = _WriterHooks(progress, f"writing {out.name}")
    try:
        with hooks.installed():
            writer.from_indexed_dataset(dataset, chunksize=min(100, max(1, len(dataset) // (4 * workers))))
        os.replace(tmp, out)
    except BaseException:
        hooks.stop_workers()
        _release_shared_memory(writer)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError with one clear line for bad input, before any work starts."""
    if args.src != FASHION_MNIST:
        if not Path(args.src).is_dir():
            raise ValueError(f"--src {args.src} is not a folder (give an ImageFolder root or '{FASHION_MNIST}')")
        if args.split is not None:
            raise ValueError(f"--split applies only to --src {FASHION_MNIST}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path such as {out / 'train.beton'}")
    if not out.parent.is_dir():
        raise ValueError(f"--out folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out folder {out.parent} is not writable")
    checks = [
        (args.max_res == 0 or args.max_res >= 8, f"--max-res must be at least 8 (0: no limit), got {args.max_res}"),
        (
            args.jpeg_quality is None or 1 <= args.jpeg_quality <= 100,
            f"--jpeg-quality must be in [1, 100], got {args.jpeg_quality}",
        ),
        (0.0 <= args.compress_prob <= 1.0, f"--compress-prob must be in [0, 1], got {args.compress_prob}"),
        (args.smart_threshold > 0, f"--smart-threshold must be positive, got {args.smart_threshold}"),
        (args.workers >= 1, f"--workers must be at least 1, got {args.workers}"),
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1, got {args.limit}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.ffcv_convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help=f"ImageFolder root (root/<class>/<image>) or '{FASHION_MNIST}'")
    parser.add_argument("--split", choices=("train", "test"), help=f"split of --src {FASHION_MNIST} (default train)")
    parser.add_argument("--out", required=True, help="output .beton path (written atomically)")
    parser.add_argument(
        "--max-res", type=int, default=DEFAULT_MAX_RES,
        help=f"resize so the longest side is at most this (default {DEFAULT_MAX_RES}, as the FFCV ImageNet example: "
        "the loader's per-image decode buffers, pinned on CUDA machines, scale with it); 0 keeps full resolution",
    )
    parser.add_argument(
        "--write-mode",
        choices=WRITE_MODES,
        default=None,
        help="default: jpg for folders, raw for fashion-mnist",
    )
    parser.add_argument("--jpeg-quality", type=int, default=None, help=f"default {DEFAULT_JPEG_QUALITY}")
    parser.add_argument("--compress-prob", type=float, default=0.5, help="JPEG share in write mode 'proportion'")
    parser.add_argument(
        "--smart-threshold",
        type=int,
        default=DEFAULT_SMART_THRESHOLD,
        help="raw bytes above which write mode 'smart' stores JPEG",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=None, help="convert only this many images, evenly spaced")
    return parser.parse_args(argv)


def _human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, soft_wrap=True)
    try:
        validate_args(args)
        max_res = args.max_res or None  # 0: no limit
        source = load_source(args.src, args.split or "train", max_res, args.limit)
    except (ValueError, FileNotFoundError) as error:
        print(f"ffcv_convert: {error}", file=sys.stderr)
        return 2
    from ffcv.fields import RGBImageField

    mode = args.write_mode or source.default_mode
    if mode == "raw" and args.jpeg_quality is not None:
        err.print("[yellow]warning:[/] --jpeg-quality has no effect in write mode 'raw' (ffcv stores pixels)")
    for path, reason in source.bad_files:
        err.print(f"[yellow]skipped unreadable file[/] {path}: {reason}")
    field = RGBImageField(
        write_mode=mode,
        max_resolution=max_res,
        smart_threshold=args.smart_threshold,
        jpeg_quality=args.jpeg_quality or DEFAULT_JPEG_QUALITY,
        compress_probability=args.compress_prob,
    )
    start = time.perf_counter()
    try:
        with new_progress(err) as progress:
            write_beton(source.dataset, args.out, field, args.workers, progress)
    except ConversionError as error:
        print(f"ffcv_convert: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ffcv_convert: interrupted; no output written", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    count = len(source.dataset)
    print(
        f"wrote {count} images ({source.classes} classes, mode {mode}) to {args.out}: "
        f"{_human_bytes(os.path.getsize(args.out))} in {seconds:.1f} s ({count / seconds:,.0f} images/s)"
        + (f"; skipped {len(source.bad_files)} unreadable file(s)" if source.bad_files else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
