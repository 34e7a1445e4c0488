"""Preemption: SIGTERM / SIGINT ask the trainer to finish its step, checkpoint and exit."""

from __future__ import annotations

import signal
from types import FrameType


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: workers ignore SIGTERM / SIGINT and leave stopping to the main process.

    `timeout`, SLURM, Kubernetes and a terminal's Ctrl-C signal the whole process group; a worker killed by
    it makes torch raise in the main process (from its SIGCHLD handler, at any point of the step) before
    the trainer can checkpoint. The main process shuts its workers down itself when it exits."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Installs handlers that only record the signal; the training loop decides when to stop.

    Repeated signals are harmless (a launcher and a terminal may both deliver one), so stopping
    never aborts a checkpoint half-way; the checkpoint write itself is atomic anyway.

    Create it in the main thread (Python installs signal handlers only there); `restore()` puts the
    previous handlers back.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + signal number, the shell convention, so job scripts see the run did not finish.
        A rank stopping because another rank was signalled reports SIGTERM."""
        return 128 + (self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
