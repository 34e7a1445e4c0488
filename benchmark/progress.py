"""Time budgets and visible progress for the long benchmark commands (throughput.py, acceptance).

A GPU machine is lent for minutes, not hours, and a command cut by its time limit must still have said
where it was and kept what it measured. `Budget` answers "may this start, and how long may it take?";
`Heartbeat` prints what is happening at least every `interval` seconds while it runs, from a thread, so
a long compilation or pipeline build is never a silent minute.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

HEARTBEAT_S = 15.0  # the longest silence a user sees from a running check


class Budget:
    """Seconds for a whole command, measured on `clock` (replaceable in tests) from `started` (default: now).

    `None` seconds: no limit (every question answers yes / the asked value)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None):
        if seconds is not None and seconds <= 0:
            raise ValueError(f"--budget must be above 0 seconds, got {seconds}")
        self.seconds = seconds
        self.clock = clock
        self.started = clock() if started is None else started

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def spent(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds left; infinite without a limit."""
        return float("inf") if self.seconds is None else max(0.0, self.seconds - self.spent())

    def allow(self, needs: float, reserve: float = 0.0) -> float | None:
        """The seconds a step needing at least `needs` may take while `reserve` seconds stay for the steps
        after it; None when it cannot have `needs` (so it is not started)."""
        available = self.left() - reserve
        return available if available >= needs else None


class Heartbeat:
    """Print `<label>: <phase>, <seconds in this phase> s` every `interval` seconds while inside `with`.

    The phase is set with `beat.phase("compiling the step")`; each new phase is printed at once too, so
    the log shows every stage even when it is short."""

    def __init__(self, label: str, interval: float = HEARTBEAT_S, stream: TextIO | None = None):
        self.label = label
        self.interval = interval
        self.stream = stream
        self._phase = "starting"
        self._since = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(f"{self.label}: {text}", file=stream, flush=True)

    def phase(self, text: str) -> None:
        with self._lock:
            self._phase, self._since = text, time.monotonic()
        self._print(text)

    def status(self, text: str) -> None:
        """Change what the next heartbeat line says without printing now (e.g. a child's last log line);
        the seconds still count from the last `phase`."""
        with self._lock:
            self._phase = text

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                text, since = self._phase, self._since
            self._print(f"{text}, {time.monotonic() - since:.0f} s")

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.label}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
