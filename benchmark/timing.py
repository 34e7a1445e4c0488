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
    """Images/s of `runs` timed repetitions, each over `per_run` units (batches, steps, files)."""

    runs: tuple[float, ...]
    warmup: int
    per_run: int
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median in percent: the run-to-run noise of this figure."""
        return 100.0 * (max(self.runs) - min(self.runs)) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return {"images_per_s": self.median, "min": min(self.runs), "max": max(self.runs),
                "spread_pct": self.spread_pct, **asdict(self), "runs": list(self.runs)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(run: Callable[[], int], repeats: int, device: torch.device) -> list[float]:
    """Call `run` (which returns how many images it handled) `repeats` times; images/s of each call."""
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        images = run()
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return rates


def endless(loader: TwoViewLoader) -> Iterator[Batch]:
    """Batches across epoch boundaries, calling set_epoch as a trainer does."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_stream(
    stream: Iterator[Batch], consume: Callable[[Batch], None], warmup: int, per_run: int, repeats: int,
    device: torch.device, unit: str,
) -> Rate:
    """Rate of `consume(batch)` over a batch stream: `warmup` untimed batches, then `repeats` runs of
    `per_run` batches. The stream continues across runs, so every run sees a warm pipeline."""
    for _ in range(warmup):
        consume(next(stream))

    def run() -> int:
        images = 0
        for _ in range(per_run):
            batch = next(stream)
            consume(batch)
            images += batch[0].shape[0]
        return images

    return Rate(tuple(time_runs(run, repeats, device)), warmup, per_run, unit)


def measure_loader(stream: Iterator[Batch], warmup: int, batches: int, repeats: int, device: torch.device) -> Rate:
    """Loader-only images/s of a batch stream (`endless(loader)`); an image = both views on `device`."""
    return measure_stream(stream, lambda batch: None, warmup, batches, repeats, device, "batches")


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
