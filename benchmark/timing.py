"""Shared timing for every benchmark: warm-up excluded, repeated runs, median and spread, and a record
of the machine the numbers came from.

A rate is `items / seconds` of one timed run; `Rate` keeps every run so readers can judge the noise.
Device work is asynchronous on CUDA, so every timed run ends with `synchronize(device)` before the
clock stops: a run is charged for all the work it queued.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from pipelines.base import Batch, TwoViewLoader

REPO = Path(__file__).resolve().parents[1]
# Distribution names whose versions go into every result (the first installed DALI build is kept).
PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "ffcv", "numba", "numpy",
            "pillow", "opencv-python-headless")


@dataclass(frozen=True)
class Rate:
    """Images/s of `runs` timed repetitions, each over at least `per_run` units (batches, steps, files)
    and, for stream figures, at least `min_seconds`: a run goes on by time, not by count, so a slow
    step is timed as long as a fast loader and the spread shrinks accordingly."""

    runs: tuple[float, ...]
    warmup: int
    per_run: int
    unit: str
    min_seconds: float = 0.0
    seconds: tuple[float, ...] = ()  # each run's wall time
    units: tuple[int, ...] = ()  # units each run took
    # Wall time of the untimed warm-up (for a compiled step: mostly compilation), so a reader can tell
    # after how many steps compiling pays for itself.
    warmup_seconds: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median in percent: the run-to-run noise of this figure."""
        return 100.0 * (max(self.runs) - min(self.runs)) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return {"images_per_s": self.median, "min": min(self.runs), "max": max(self.runs),
                "spread_pct": self.spread_pct, **asdict(self), "runs": list(self.runs),
                "seconds": list(self.seconds), "units": list(self.units)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(run: Callable[[], tuple[int, int]], repeats: int, device: torch.device) -> list[tuple[float, float, int]]:
    """Call `run` (which returns the images and units it handled) `repeats` times; (images/s, seconds,
    units) of each call. The clock stops after the device has finished the work the run queued."""
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    timed = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        images, units = run()
        synchronize(device)
        seconds = time.perf_counter() - start
        timed.append((images / seconds, seconds, units))
    return timed


def rate_of(timed: list[tuple[float, float, int]], warmup: int, per_run: int, unit: str,
            min_seconds: float = 0.0, warmup_seconds: float = 0.0) -> Rate:
    rates, seconds, units = zip(*timed, strict=True)
    return Rate(tuple(rates), warmup, per_run, unit, min_seconds, tuple(seconds), tuple(units), warmup_seconds)


def endless(loader: TwoViewLoader) -> Iterator[Batch]:
    """Batches across epoch boundaries, calling set_epoch as a trainer does."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_stream(
    stream: Iterator[Batch], consume: Callable[[Batch], None], warmup: int, per_run: int, repeats: int,
    device: torch.device, unit: str, min_seconds: float = 0.0, max_seconds: float | None = None,
) -> Rate:
    """Rate of `consume(batch)` over a batch stream: `warmup` untimed batches, then `repeats` runs of at
    least `per_run` batches and at least `min_seconds` each; a run past `max_seconds` (a budget's cap)
    ends after the batch it is in, with at least one batch. The stream continues across runs, so every
    run sees a warm pipeline."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        consume(next(stream))
    synchronize(device)
    warmup_seconds = time.perf_counter() - start

    def run() -> tuple[int, int]:
        images = batches = 0
        start = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - start
            if batches and max_seconds is not None and elapsed >= max_seconds:
                break
            if batches >= per_run and elapsed >= min_seconds:
                break
            batch = next(stream)
            consume(batch)
            images += batch[0].shape[0]
            batches += 1
        return images, batches

    return rate_of(time_runs(run, repeats, device), warmup, per_run, unit, min_seconds, warmup_seconds)


def measure_loader(stream: Iterator[Batch], warmup: int, batches: int, repeats: int, device: torch.device,
                   min_seconds: float = 0.0, max_seconds: float | None = None) -> Rate:
    """Loader-only images/s of a batch stream (`endless(loader)`); an image = both views on `device`."""
    return measure_stream(stream, lambda batch: None, warmup, batches, repeats, device, "batches", min_seconds,
                          max_seconds)


def warm_os_cache(paths: Iterable[str | os.PathLike]) -> int:
    """Read every file once so the first timed pass does not pay for the disk; returns bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    return total


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """HEAD, with '+dirty' when tracked files differ from it (the numbers may not match the commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def environment(device: torch.device) -> dict:
    """Where the numbers came from: device, CPU, load, versions, commit."""
    cores = len(os.sched_getaffinity(0))
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_cores_used": cores,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "hostname": platform.node(),
        "versions": versions(),
        "git_commit": git_commit(),
    }
