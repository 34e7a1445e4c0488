"""Atomic files: a write goes to a temp file in the same folder, is flushed and fsync'ed, renamed over the final
name with os.replace (atomic on POSIX) and the folder is fsync'ed, so a crash leaves either the old file or the
new one, never a half-written one under the final name. The temp files of writers killed mid-write are swept
by whoever owns the folder."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

# `atomic_write`'s temp files: .<name>.tmp-<host>-<pid> (.<name>.tmp-<pid> before the host was added).
TEMP_NAME = re.compile(r"^\..+\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def temp_path(path: Path) -> Path:
    """Where `atomic_write` writes before the rename: named by host and pid, so a later run can tell a dead
    writer's leftover from a live one's even when several machines share the folder."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temp files of writers killed mid-write (up to a checkpoint's size each) and return them.
    Only files of this host whose process is gone: a live writer's file, or another host's, is left alone."""
    if not folder.is_dir():
        return []
    host = socket.gethostname()
    stale = [path for path in folder.iterdir()
             if (m := TEMP_NAME.match(path.name)) and m.group("host") in (host, None)
             and not pid_alive(int(m.group("pid")))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
