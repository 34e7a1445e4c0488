"""runtime/metrics.py: the log window's rate and loader-wait share, and the progress line."""

from __future__ import annotations

import runtime.metrics as metrics
from runtime.metrics import Window, format_record


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_windows_rate_leaves_out_the_warm_up_step(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    window = Window()
    clock.now += 10.0  # the first step: loader start, kernel selection (and compiling)
    window.step_done(8)
    for _ in range(4):  # then four steps of 0.1 s, 0.05 s of each waiting for the loader
        window.waited += 0.05
        clock.now += 0.1
        window.step_done(8)
    # 32 images in 0.4 s, half of it waiting: not 40 images in 10.4 s (3.8 img/s).
    images_per_s, wait = window.close()
    assert abs(images_per_s - 80.0) < 1e-9 and abs(wait - 0.5) < 1e-9
    clock.now += 2.0  # the next window counts everything again
    window.step_done(8)
    assert window.close() == (4.0, 0.0)


def test_a_window_of_only_the_warm_up_step_reports_it_as_it_was(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    window = Window()
    clock.now += 4.0
    window.step_done(8)
    assert window.close() == (2.0, 0.0)


def test_the_progress_line_names_the_knn_k():
    record = {"step": 10, "epoch": 0, "loss": 1.0, "lr": 0.1, "tau": 0.99, "images_per_s": 100.0,
              "loader_wait": 0.1, "knn_top1": 0.5, "knn_k": 10}
    assert format_record(record, 20).endswith("kNN (k=10) top-1 50.00%")
