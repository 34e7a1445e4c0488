"""The --out folder: created and probed before anything is built, and held by one run at a time.

Two trainers on one --out would interleave metrics and overwrite each other's checkpoints and
backbone.pt. The run takes an exclusive `flock` on OUT/.fastbyol.lock and writes who it is into it;
the OS drops the lock when the process ends, however it ends, so a crashed or killed run never
leaves --out locked. A run that ends normally deletes the lock file while it still holds the lock (and an
--out it created that holds nothing else), so a refused run leaves nothing behind. A contender that opened
the file before that deletion would lock the deleted inode: every run therefore checks, once it holds the
lock, that the path still names the inode it locked, and tries again otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from foundation.atomic_files import sweep_stale_temp_files
from runtime.checkpoint import run_checkpoints
from runtime.distributed import is_launching_process

if TYPE_CHECKING:
    from config import TrainConfig

LOCK_NAME = ".fastbyol.lock"
# A file system that cannot lock (some FUSE and old NFS mounts) answers flock with one of these.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
# Retries when the lock file was deleted between our open and our flock (its holder ended meanwhile).
LOCK_ATTEMPTS = 10


def prepare_out(out: Path) -> None:
    """Create --out and write a probe file in it. `os.access` cannot tell: it says yes to root on read-only
    mounts and /proc, and nothing about a parent that is a regular file."""
    probe = out / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"fastbyol")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create files there ({err.strerror or err}); "
                         "choose a writable folder") from None


def _holder(fd: int) -> str:
    """'pid P on host H, started T' from a held lock file (written by `OutLock.__enter__`)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):  # the holder has not written its line yet
        return "holder not known yet"


class OutLock:
    """`with OutLock(out):` holds --out for this run; a second run gets ValueError naming the holder."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutLock:
        for _ in range(LOCK_ATTEMPTS):
            fd = self._open_and_lock()
            if fd is None or _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file its holder had just deleted: lock the one at the path now
        else:
            raise ValueError(f"--out {self.out}: its lock file keeps being replaced; is another run starting "
                             "there over and over?")
        if fd is None:
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def _open_and_lock(self) -> int | None:
        """The locked lock file's descriptor; None on a file system without locks (with a warning)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ValueError(f"--out {self.out} is in use by another run ({holder}); wait for it to end, "
                             "stop it, or choose another --out") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in NO_LOCKS:
                raise ValueError(f"--out {self.out}: cannot lock {self.path} ({err.strerror})") from None
            # Refusing would make such a mount unusable; run, but say what is not guarded.
            print(f"warning: --out {self.out}: its file system cannot lock files ({err.strerror}), so nothing "
                  "stops a second run from writing into it too", file=sys.stderr)
            return None
        return fd

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still holding the lock: a contender re-checks the path (above)
            os.close(self._fd)  # releases the flock
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_if_empty(folder: Path) -> None:
    """rmdir an --out this run created when nothing was written into it (the run was refused)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def claim_out(cfg: TrainConfig) -> contextlib.ExitStack:
    """Create --out and check it is writable; in the launching process (rank 0 under torchrun) also lock it for
    this run, clear what dead writers left in it, and refuse its checkpoints unless --resume. The returned
    stack holds the lock: keep it open for the run."""
    out = Path(cfg.out)
    created = not out.exists()
    prepare_out(out)
    checkpoints = run_checkpoints(out, cfg.keep_checkpoints)
    held = contextlib.ExitStack()
    try:
        if is_launching_process():
            if created:
                held.callback(_remove_if_empty, out)  # runs last, once the lock file is gone
            held.enter_context(OutLock(out))
            _report_swept(sweep_stale_temp_files(out) + checkpoints.sweep_stale_temp_files())
        # Checked once this run holds --out: before that, the checkpoints may be a live run's.
        if not cfg.resume and checkpoints.paths():
            raise ValueError(f"--out {cfg.out} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another --out")
    except BaseException:
        held.close()
        raise
    return held


def _report_swept(paths: list[Path]) -> None:
    if paths:
        print(f"note: removed {len(paths)} unfinished file write(s) of stopped processes: "
              + ", ".join(str(p) for p in paths))
