"""Convert an ImageFolder tree or the built-in Fashion-MNIST to an FFCV .beton file (image + label).

    python -m datasources.ffcv_convert --src data/imagenet/train --out train.beton
    python -m datasources.ffcv_convert --src fashion-mnist --split train --out fmnist.beton

Write modes (ffcv's RGBImageField): 'jpg' stores JPEG (re-encoded at --jpeg-quality), 'raw' stores
pixels (ffcv ignores --jpeg-quality there), 'smart' stores JPEG only for images whose raw size
exceeds --smart-threshold bytes, 'proportion' JPEG-encodes a random --compress-prob share.
Defaults: 'jpg' for folders (the loader's job is decoding JPEGs fast); 'raw' for Fashion-MNIST,
whose 28x28 images (stored as 3-channel RGB, 2.3 KB each) gain nothing from JPEG but its loss
and decode cost.

Unreadable files are found by the ImageFolder pre-scan, skipped and listed; a file that passes
the scan but cannot be decoded when it is written (deleted since, or a corrupt body between
intact markers) is skipped too, with a warning naming it, and counted in the summary. Images
are resized so the longest side is at most --max-res, keeping at least 1 px on every side.

The output appears atomically: the writer fills a hidden temp file next to --out that is renamed
into place only when complete. --out is checked before any work (its folder must accept a new
file; an existing file there must be a .beton, which is then replaced). SIGINT (Ctrl-C) and
SIGTERM stop the conversion at once: the writer workers are killed, the temp file and the shared
memory segment removed, and the exit code is 128 + the signal (130, 143). Killed outright, it takes
its workers with it (PR_SET_PDEATHSIG), and the next conversion into the folder removes its temp file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import multiprocessing.queues
import os
import queue
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import Process, Queue
from pathlib import Path
from types import FrameType

import cv2
import numpy as np
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

from datasources.fashion_mnist import load_fashion_mnist
from datasources.imagefolder import DECODE_ERRORS, open_rgb, scan_image_folder
from foundation.atomic_files import sweep_stale_temp_files, temp_path
from foundation.signals import StopRequest

FASHION_MNIST = "fashion-mnist"
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# 'smart' with ffcv's default threshold (None) silently stores everything raw; 256x256 RGB is the
# size above which JPEG pays off on ImageNet-like images.
DEFAULT_SMART_THRESHOLD = 256 * 256 * 3
DEFAULT_JPEG_QUALITY = 90
DEFAULT_MAX_RES = 512
# ffcv's .beton header (ffcv.types.HeaderType; the tests check they agree), read here without
# importing ffcv, which compiles numba code for seconds: --out is checked before any work.
BETON_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                         ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
BETON_VERSION = 2
# What a sample that cannot be decoded is written as, until `drop_samples` takes it out again.
PLACEHOLDER = (np.zeros((1, 1, 3), np.uint8), -1)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ConversionError(RuntimeError):
    """The conversion failed; the message says why and no output file was left behind."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, as KeyboardInterrupt: `except Exception` lets it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class InterruptOnSignal(StopRequest):
    """SIGINT / SIGTERM raise Interrupted in the main thread; later signals are only recorded, so the
    cleanup they trigger runs to the end. Default SIGTERM would kill the process with its writer
    workers, temp file and shared memory left behind.

    The signal is recorded as well: a KeyboardInterrupt raised while ffcv is imported (numba compiling)
    vanished, and the run went on to write the whole file; `check()` after the import raises it again.
    """

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self.requested
        super()._handle(signum, frame)
        if first:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.requested:
            raise Interrupted(self.signum)


class UnreadableSample(Exception):
    """A sample's file cannot be decoded (it passed the pre-scan, which reads only its head and tail)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _decode_failure(err: Exception) -> str:
    """Why a file that passed the scan failed to decode, in the words of imagefolder.read_rgb."""
    if isinstance(err, FileNotFoundError):
        return "the file no longer exists (deleted after the scan)"
    return f"cannot decode ({err})"


def fit_within(image: np.ndarray, max_res: int | None) -> np.ndarray:
    """`image` shrunk so its longest side is `max_res` (area interpolation and sizes as ffcv's writer),
    but with at least 1 px on every side: ffcv's own resize turns a 10000 x 50 image at 64 px into a
    zero-pixel side, which OpenCV rejects. ffcv leaves an image that already fits alone."""
    height, width = image.shape[:2]
    if max_res is None or max(height, width) <= max_res:
        return image
    ratio = max_res / max(height, width)
    size = (max(1, min(max_res, int(width * ratio))), max(1, min(max_res, int(height * ratio))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def load_rgb(path: str, max_res: int | None) -> np.ndarray:
    """The image at `path` decoded as every loader decodes it (open_rgb; a JPEG DCT-scaled straight to
    at least max_res), as an RGB uint8 array whose longest side is at most `max_res`."""
    return fit_within(np.asarray(open_rgb(path, min_side=max_res)), max_res)


class FolderImages:
    """Indexable (RGB uint8 array, label) view of ImageFolder samples, decoded in the writer's workers.

    A sample that fails to decode raises UnreadableSample (`write_beton` leaves it out).

    Parameters
    ----------
    samples: (path, class index) pairs (`ImageFolderIndex.samples`).
    max_res: longest side in pixels the images are shrunk to (`load_rgb`); None keeps their size.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], max_res: int | None) -> None:
        self.samples = list(samples)
        self.max_res = max_res

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        try:
            return load_rgb(path, self.max_res), label
        except DECODE_ERRORS as err:
            raise UnreadableSample(path, _decode_failure(err)) from err


class GrayImages:
    """Indexable (RGB uint8 array, label) view of grayscale arrays (N, H, W): channels repeated.

    Parameters
    ----------
    images: uint8 (N, H, W) grayscale images (e.g. `load_fashion_mnist`).
    labels: (N,) integer labels.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.repeat(self.images[index][:, :, None], 3, axis=2), int(self.labels[index])


class _SkipUnreadable:
    """`dataset` as the writer's workers read it: an UnreadableSample becomes PLACEHOLDER, and its
    (index, path, reason) goes to `reports` for the main process to drop and list."""

    def __init__(self, dataset, reports: Queue) -> None:
        self.dataset, self.reports = dataset, reports

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            return self.dataset[index]
        except UnreadableSample as err:
            self.reports.put((index, err.path, err.reason))
            return PLACEHOLDER


@dataclass
class Source:
    """What `load_source` found to convert.

    Attributes
    ----------
    dataset: the samples, read by the writer's workers.
    classes: the number of classes.
    bad_files: (path, reason) of the files the folder scan already skipped (none for Fashion-MNIST).
    default_mode: the RGBImageField write mode when --write-mode is not given: 'raw' for the 28 px
        Fashion-MNIST images, 'jpg' for an ImageFolder.
    """

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
    """The samples of --src to convert.

    Parameters
    ----------
    src: an ImageFolder root, or 'fashion-mnist' (its idx files under FASHION_MNIST_DIR).
    split: the Fashion-MNIST split, 'train' or 'test' (ignored for a folder).
    max_res: longest side in pixels a folder's images are shrunk to; None keeps their size.
    limit: convert at most this many samples, spread evenly over the sorted list (`evenly_spaced`); None: all.
    """
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


def _worker(target, parent: int, *args) -> None:
    """A writer worker. SIGINT is left to the parent, which kills the workers (a terminal's Ctrl-C
    reaches the whole process group); the kernel kills the worker if the parent dies outright."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(AttributeError, OSError):  # prctl is Linux's
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    target(*args)


class _WatchedQueue(multiprocessing.queues.Queue):
    """A multiprocessing queue whose blocking get in the main process gives up when a writer worker
    has died: ffcv waits on one for each worker's allocation table after the last sample, and a worker
    that fails at its very end (the disk full while it flushes its last page) would never send it."""

    def __init__(self, hooks: _WriterHooks, maxsize: int = 0) -> None:
        super().__init__(maxsize, ctx=multiprocessing.get_context())
        self.hooks = hooks

    def get(self, block: bool = True, timeout: float | None = None):
        if not block or timeout is not None or os.getpid() != self._opid:  # workers wait as usual
            return super().get(block, timeout)
        while True:
            with contextlib.suppress(queue.Empty):
                return super().get(timeout=0.2)
            self.hooks.check_workers()


class _WriterHooks:
    """Stand-ins for ffcv.writer's tqdm, Process, Queue and sleep while one conversion runs.

    ffcv's writer shows a tqdm bar and waits for its worker processes by polling a shared counter
    forever: a worker that dies (an image that fails to decode) would hang it. The hooks show a rich
    bar instead, turn a dead worker into a ConversionError, keep hold of the workers and queues so
    an aborted conversion can end them, and collect the workers' reports of unreadable samples.
    """

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description
        self.workers: list[Process] = []
        self.queues: list[Queue] = []
        self.reports: Queue = self.queue()
        self.skipped: list[tuple[int, str, str]] = []  # (index, path, reason)
        self.task = None

    def tqdm(self, total: int) -> _WriterHooks:
        self.task = self.progress.add_task(self.description, total=total)
        return self

    def update(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def close(self) -> None:
        self.progress.refresh()

    def process(self, target, args: tuple = (), **kwargs) -> Process:
        worker = Process(target=_worker, args=(target, os.getpid(), *args), **kwargs)
        self.workers.append(worker)
        return worker

    def queue(self, maxsize: int = 0) -> Queue:
        created = _WatchedQueue(self, maxsize)
        self.queues.append(created)
        return created

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        self._drain_reports()
        self.check_workers()

    def check_workers(self) -> None:
        failed = [w for w in self.workers if w.exitcode not in (None, 0)]
        if failed:
            raise ConversionError(
                f"a writer worker exited with code {failed[0].exitcode}; its traceback above names the "
                "cause (a file to fix or remove, a full disk): fix it and run again"
            )

    def _drain_reports(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.skipped.append(self.reports.get_nowait())

    def collect_reports(self) -> list[tuple[int, str, str]]:
        """Every unreadable-sample report, sorted by index: read while the workers exit, since a
        worker flushes its reports on exit and blocks there while the pipe is full."""
        while any(worker.is_alive() for worker in self.workers):
            self._drain_reports()
            time.sleep(0.01)
        self._drain_reports()
        return sorted(self.skipped)

    def stop_workers(self) -> None:
        """Kill the workers still running (they append to the output file by name), and let the
        process exit without flushing the queues: their feeder threads would wait forever to
        write the work nobody reads any more."""
        for worker in self.workers:
            if worker.pid is None:  # never started
                continue
            if worker.is_alive():
                worker.kill()
            worker.join()
        for pending in self.queues:
            pending.cancel_join_thread()
            pending.close()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import ffcv.writer

        names = ("tqdm", "Process", "Queue", "sleep")
        saved = {name: getattr(ffcv.writer, name) for name in names}
        for name, hook in zip(names, (self.tqdm, self.process, self.queue, self.sleep), strict=True):
            setattr(ffcv.writer, name, hook)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(ffcv.writer, name, value)


def new_progress(console: Console | None = None) -> Progress:
    """The rich progress display `write_beton` reports to; `console`: where it prints (default: rich's stdout)."""
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


def create_temp(out: Path) -> Path:
    """A new empty hidden file next to `out` (so os.replace stays on one file system), named by host
    and pid as the checkpoints' temp files are, so that a later run removes it if this one is killed
    outright (SIGKILL); with the permissions the umask gives (mkstemp's are 0600)."""
    tmp = temp_path(out)
    os.close(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o666))
    return tmp


def sweep_stale_temps(folder: Path, console: Console) -> None:
    """Remove, naming each, the temp files that writers killed outright left in `folder`."""
    for stale in sweep_stale_temp_files(folder):
        console.print(f"removed {stale}, the temp file of a writer that was killed")


def drop_samples(path: str | os.PathLike, drop: Sequence[int]) -> int:
    """Take the samples `drop` out of the .beton at `path` in place; return how many remain.

    A reader finds samples through the header's count, the metadata rows and the allocation table
    (absolute file offsets) only, so those three are rewritten; the dropped samples' bytes stay in
    their pages, unreferenced.
    """
    from ffcv.reader import Reader

    reader = Reader(str(path))
    total = int(reader.num_samples)
    keep = np.setdiff1d(np.arange(total), np.asarray(drop, dtype=np.int64))
    renumber = np.full(total, -1, dtype=np.int64)
    renumber[keep] = np.arange(len(keep))
    table = reader.alloc_table[renumber[reader.alloc_table["sample_id"].astype(np.int64)] >= 0].copy()
    table["sample_id"] = renumber[table["sample_id"].astype(np.int64)]
    header = np.array(reader.header)
    header["num_samples"] = len(keep)
    with open(path, "r+b") as f:
        f.write(header.tobytes())
        f.seek(header.nbytes + reader.field_descriptors.nbytes)
        f.write(reader.metadata[keep].tobytes())
        f.seek(int(header["alloc_table_ptr"]))
        f.write(table.tobytes())
        f.truncate()
    return len(keep)


def compact_pages(path: str | os.PathLike) -> int:
    """Pack the samples of the .beton at `path` into consecutive pages in place; return the new size.

    ffcv's writer gives each worker process its own page and writes every worker's last page whole, so
    a .beton carried up to one partly empty page per worker (8 MiB each with ffcv's default page): the
    same 640 photos made 32 MB with 2 workers and 136 MB with 16. Here every region keeps its order in
    the file and moves down to the first place it fits, under the writer's own rule (a sample's regions
    share one page), so the size no longer depends on the worker count; dropped samples' bytes go too.
    Moving down in file order never overwrites a region not yet moved: each region's new end is at or
    before its old end, and the next region starts after that.
    """
    from ffcv.reader import Reader

    reader = Reader(str(path))
    page = int(reader.header["page_size"])
    table = reader.alloc_table.copy()
    order = np.argsort(table["ptr"], kind="stable")
    old_ptr = table["ptr"][order].astype(np.int64)
    sizes = table["size"][order].astype(np.int64)
    samples = table["sample_id"][order].astype(np.int64)
    # Data may start right after the metadata: a reader finds a sample's page as ptr // page_size, so the
    # only rule is that no sample crosses a page boundary (the writer's page-aligned start wasted up to a page).
    cursor = reader.header.nbytes + reader.field_descriptors.nbytes + reader.metadata.nbytes
    new_ptr = np.empty_like(old_ptr)
    i = 0
    while i < len(order):
        j = i + 1  # a sample's regions lie together in one page
        while j < len(order) and samples[j] == samples[i]:
            j += 1
        need = int(sizes[i:j].sum())
        if cursor % page + need > page:
            cursor = -(-cursor // page) * page
        new_ptr[i:j] = cursor + np.concatenate(([0], np.cumsum(sizes[i:j])[:-1]))
        cursor += need
        i = j
    metadata = reader.metadata.copy()
    moved = dict(zip(old_ptr.tolist(), new_ptr.tolist(), strict=True))
    for field_name in metadata.dtype.names:
        for column in metadata[field_name].dtype.names or ():
            if column.endswith("ptr"):  # RGBImageField's data_ptr, Bytes/NDArray fields' ptr
                pointers = metadata[field_name][column]
                pointers[:] = [moved.get(int(v), int(v)) for v in pointers]
    table["ptr"][order] = new_ptr
    header = np.array(reader.header)
    header["alloc_table_ptr"] = cursor
    fd = os.open(path, os.O_RDWR)
    try:
        for src, dst, size in zip(old_ptr.tolist(), new_ptr.tolist(), sizes.tolist(), strict=True):
            if src != dst:
                os.pwrite(fd, os.pread(fd, size, src), dst)
        os.pwrite(fd, header.tobytes(), 0)
        os.pwrite(fd, metadata.tobytes(), reader.header.nbytes + reader.field_descriptors.nbytes)
        os.pwrite(fd, table.tobytes(), cursor)
        os.ftruncate(fd, cursor + table.nbytes)
    finally:
        os.close(fd)
    return cursor + table.nbytes


def _chunksize(samples: int, workers: int) -> int:
    return min(100, max(1, samples // (4 * workers)))


def write_beton(dataset, out: str | os.PathLike, image_field, workers: int,
                progress: Progress) -> list[tuple[str, str]]:
    """Write (image, label) samples of `dataset` to `out` atomically (temp file + os.replace).

    Samples whose __getitem__ raises UnreadableSample are left out; returns their (path, reason).
    On any failure or interruption the workers are killed and the temp file and the writer's
    shared memory removed before the exception goes on.

    Parameters
    ----------
    dataset: indexable (RGB uint8 (H, W, 3) array, int label) samples with len() (`FolderImages`,
        `GrayImages`); ConversionError when none of them can be read.
    out: the .beton to write; its folder's stale temp files from killed writers are removed first.
    image_field: the ffcv RGBImageField the images are stored with (write mode, max resolution, JPEG quality).
    workers: ffcv's writer processes, which read `dataset`.
    progress: the display the writing shows on (`new_progress`), started by the caller.
    """
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    import foundation.numba_runtime  # noqa: F401  (numba settings, before FFCV runs: see there)

    out = Path(out)
    hooks = _WriterHooks(progress, f"writing {out.name}")
    tmp = writer = None
    try:
        sweep_stale_temps(out.parent, progress.console)
        tmp = create_temp(out)
        writer = DatasetWriter(str(tmp), {"image": image_field, "label": IntField()}, num_workers=workers)
        with hooks.installed():
            writer.from_indexed_dataset(_SkipUnreadable(dataset, hooks.reports),
                                        chunksize=_chunksize(len(dataset), workers))
            skipped = hooks.collect_reports()
        if skipped and drop_samples(tmp, [index for index, _, _ in skipped]) == 0:
            raise ConversionError(f"none of the {len(dataset)} images can be decoded, e.g. "
                                  f"{skipped[0][1]}: {skipped[0][2]}")
        compact_pages(tmp)
        os.replace(tmp, out)
    except BaseException:
        hooks.stop_workers()
        _release_shared_memory(writer)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return [(path, reason) for _, path, reason in skipped]


def is_beton(path: Path) -> bool:
    """Whether the regular file `path` starts with a .beton header (an empty file counts: replacing
    it loses nothing)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(BETON_HEADER.itemsize)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if not raw:
        return True
    if len(raw) < BETON_HEADER.itemsize:
        return False
    header = np.frombuffer(raw, dtype=BETON_HEADER)[0]
    page = int(header["page_size"])
    return (int(header["version"]) == BETON_VERSION and int(header["num_fields"]) > 0 and page > 0
            and page & (page - 1) == 0 and int(header["alloc_table_ptr"]) <= size)


def check_output(out: Path) -> None:
    """Raise ValueError unless `out` can be written: a new file can be created in its folder (tried,
    not `os.access`, which says yes to root everywhere, /proc included) and what it would replace is
    a .beton."""
    folder = out.parent
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path such as {out / 'train.beton'}")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if not folder.is_dir():
        raise ValueError(f"--out folder {folder} does not exist; create it first")
    if out.exists() and not (out.is_file() and is_beton(out)):
        raise ValueError(f"--out {out} exists and is not a .beton file; move it away or choose another --out "
                         "(only a .beton is replaced)")
    try:
        create_temp(out).unlink()
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create a file in {folder} ({err.strerror or err})") from err


def validate_args(args: argparse.Namespace) -> None:
    """Raise ValueError with one clear line for bad input, before any work starts."""
    if args.src != FASHION_MNIST:
        if not Path(args.src).is_dir():
            raise ValueError(f"--src {args.src} is not a folder (give an ImageFolder root or '{FASHION_MNIST}')")
        if args.split is not None:
            raise ValueError(f"--split applies only to --src {FASHION_MNIST}")
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
    check_output(Path(args.out))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m datasources.ffcv_convert",
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


def _image_field(args: argparse.Namespace, mode: str, max_res: int | None):
    from ffcv.fields import RGBImageField

    return RGBImageField(
        write_mode=mode,
        max_resolution=max_res,
        smart_threshold=args.smart_threshold,
        jpeg_quality=args.jpeg_quality or DEFAULT_JPEG_QUALITY,
        compress_probability=args.compress_prob,
    )


def convert(args: argparse.Namespace, interrupts: InterruptOnSignal) -> int:
    """The conversion `main` runs with signal handling in place; returns the exit code."""
    err = Console(stderr=True, soft_wrap=True)
    try:
        validate_args(args)
        max_res = args.max_res or None  # 0: no limit
        source = load_source(args.src, args.split or "train", max_res, args.limit)
    except (ValueError, FileNotFoundError) as error:
        print(f"ffcv_convert: {error}", file=sys.stderr)
        return 2
    mode = args.write_mode or source.default_mode
    if mode == "raw" and args.jpeg_quality is not None:
        err.print("[yellow]warning:[/] --jpeg-quality has no effect in write mode 'raw' (ffcv stores pixels)")
    for path, reason in source.bad_files:
        err.print(f"[yellow]skipped unreadable file[/] {path}: {reason}")
    err.print("loading ffcv (it compiles its numba code first)")
    field = _image_field(args, mode, max_res)
    interrupts.check()
    start = time.perf_counter()
    try:
        with new_progress(err) as progress:
            skipped = write_beton(source.dataset, args.out, field, args.workers, progress)
    except ConversionError as error:
        print(f"ffcv_convert: {error}", file=sys.stderr)
        return 1
    for path, reason in skipped:
        err.print(f"[yellow]skipped unreadable file[/] {path}: {reason}")
    seconds = time.perf_counter() - start
    count, unreadable = len(source.dataset) - len(skipped), len(source.bad_files) + len(skipped)
    print(
        f"wrote {count} images ({source.classes} classes, mode {mode}) to {args.out}: "
        f"{_human_bytes(os.path.getsize(args.out))} in {seconds:.1f} s ({count / seconds:,.0f} images/s)"
        + (f"; skipped {unreadable} unreadable file(s)" if unreadable else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupts = InterruptOnSignal()
    try:
        return convert(args, interrupts)
    except Interrupted as stop:
        print(f"ffcv_convert: interrupted by {stop}; no output written, nothing left behind", file=sys.stderr)
        return interrupts.exit_code
    finally:
        interrupts.restore()


if __name__ == "__main__":
    sys.exit(main())
