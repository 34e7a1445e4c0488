"""Progress display, metric files (CSV, JSONL, TensorBoard if installed) and the end-of-run plot.

Numbers come in once per log window (the trainer reads the loss from the device every
--log-every steps, never per step). Loader wait is the wall time spent inside `next(loader)`
divided by the window's wall time: on CUDA the step only queues kernels, so a GPU-bound run
spends its time in the log point's sync (wait share near 0) and a loader-bound run blocks in
`next()` (wait share near 1).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")
COLUMNS = ("step", "epoch", "loss", "lr", "tau", "images_per_s", "loader_wait", "elapsed_s", "knn_top1")


class Window:
    """Images, wall time and time blocked in the loader since the last log point.

    The process's first step is warm-up (the loader's first batch, pipeline builds, kernel selection, compiling):
    the first window's rate is taken from the end of that step on, so the first log line does not say "1 img/s";
    only a window that holds nothing but that step reports it as it was."""

    def __init__(self) -> None:
        self.reset()
        self.warming_up = True
        self.after_warmup: tuple[float, float, int] | None = None  # (time, waited, images) when it ended

    def reset(self) -> None:
        self.start, self.waited, self.images = time.perf_counter(), 0.0, 0
        self.after_warmup = None

    def step_done(self, images: int) -> None:
        """Count a finished step's images (over all processes)."""
        self.images += images
        if self.warming_up:
            self.warming_up = False
            self.after_warmup = (time.perf_counter(), self.waited, self.images)

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """`batches` item by item, adding the time each `next()` took to the window's loader wait.

        The caller counts the window's images itself (`images`)."""
        iterator = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t0
            yield item

    def close(self) -> tuple[float, float]:
        """(images/s, loader wait share) of the window, then start a new one."""
        start, waited, images = self.start, self.waited, self.images
        if self.after_warmup is not None and images > self.after_warmup[2]:
            start, waited, images = self.after_warmup[0], waited - self.after_warmup[1], images - self.after_warmup[2]
        elapsed = max(time.perf_counter() - start, 1e-9)
        result = images / elapsed, min(1.0, waited / elapsed)
        self.reset()
        return result


def _keep_rows_up_to(path: Path, step: int, parse: Any) -> None:
    """On resume, drop rows logged after the checkpoint we resumed from (they will be redone)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for i, line in enumerate(lines) if parse(i, line) <= step))


class MetricsLog:
    """metrics.csv + metrics.jsonl in `out` (and TensorBoard events if tensorboard is installed).

    Written by the main process only; every `write` is flushed.

    Parameters
    ----------
    out: the run's output folder (made if missing); the files go in it, TensorBoard's under out/tensorboard.
    resume_step: the step of the checkpoint a resumed run starts from: the files are appended to, minus
        the rows logged after that step (they will be redone). 0: a new run, and old files are removed.
    """

    def __init__(self, out: Path, resume_step: int = 0):
        out.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = out / "metrics.csv", out / "metrics.jsonl"
        if resume_step:
            _keep_rows_up_to(self.csv_path, resume_step, lambda i, line: -1 if i == 0 else int(line.split(",")[0]))
            _keep_rows_up_to(self.jsonl_path, resume_step, lambda i, line: json.loads(line)["step"])
        else:
            self.csv_path.unlink(missing_ok=True)
            self.jsonl_path.unlink(missing_ok=True)
        new_csv = not self.csv_path.exists()
        self.csv_file = open(self.csv_path, "a", newline="")  # noqa: SIM115 - open for the whole run
        self.csv = csv.DictWriter(self.csv_file, COLUMNS)
        if new_csv:
            self.csv.writeheader()
        self.jsonl_file = open(self.jsonl_path, "a")  # noqa: SIM115
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)
        except ImportError:  # optional, as the README says: no note on every run's console
            pass

    def write(self, record: dict[str, float]) -> None:
        """One log point: a CSV row (the COLUMNS, blank where missing), a JSONL line (every key) and a
        TensorBoard scalar per key but step and epoch. `record` must hold 'step'."""
        self.csv.writerow({k: record.get(k, "") for k in COLUMNS})
        self.csv_file.flush()
        self.jsonl_file.write(json.dumps(record) + "\n")
        self.jsonl_file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.csv_file.close()
        self.jsonl_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def format_record(record: dict[str, float], total_steps: int) -> str:
    """The plain progress line of a log point; `record` needs step, epoch, loss, lr, tau, images_per_s and
    loader_wait (knn_top1 is shown when present)."""
    text = (f"step {record['step']:6d}/{total_steps}  epoch {record['epoch']}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.4g}  tau {record['tau']:.5f}  {record['images_per_s']:,.0f} img/s  "
            f"loader wait {record['loader_wait']:.0%}")
    if "knn_top1" in record:
        text += f"  kNN (k={record['knn_k']}) top-1 {record['knn_top1']:.2%}" if "knn_k" in record else \
            f"  kNN top-1 {record['knn_top1']:.2%}"
    return text


class Display:
    """A rich progress bar on a terminal; one plain line per log point otherwise (CI, log files).

    Parameters
    ----------
    total_steps: the run's optimizer steps (the bar's length).
    start_step: where the bar starts (a resumed run's step).
    enabled: False shows nothing at all (ranks other than 0).
    """

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.total_steps = total_steps
        self.enabled = enabled
        self.progress: Progress | None = None
        if enabled and sys.stdout.isatty():
            self.progress = Progress(
                TextColumn("[bold]BYOL"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()

    def update(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            print(format_record(record, self.total_steps), flush=True)
            return
        stats = (f"loss {record['loss']:.4f} lr {record['lr']:.3g} tau {record['tau']:.4f} "
                 f"{record['images_per_s']:,.0f} img/s wait {record['loader_wait']:.0%}")
        self.progress.update(self.task, completed=record["step"], stats=stats)

    def message(self, text: str, error: bool = False) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def plot_metrics(jsonl_path: Path, png_path: Path) -> bool:
    """Loss, kNN accuracy (if logged) and throughput against step, as a PNG. False without matplotlib.

    Parameters
    ----------
    jsonl_path: the run's metrics.jsonl (`MetricsLog`); non-finite values are left out of the plot.
    png_path: the image to write.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    panels = [("loss", "BYOL loss"), ("knn_top1", "kNN top-1"), ("images_per_s", "images / s")]
    panels = [(key, title) for key, title in panels if any(key in r for r in records)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True
