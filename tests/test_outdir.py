"""runtime/outdir.py: one run per --out (the lock, taken by the launching process or rank 0 only, and
file systems without locks), and the temp files of killed checkpoint writers removed on opening --out."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest

import runtime.outdir
from config import TrainConfig
from runtime.checkpoint import CheckpointDir
from runtime.outdir import OutLock, claim_out

TIMEOUT = 120


# One run per --out.

def test_only_the_launching_process_or_rank_0_takes_the_lock(tmp_path, monkeypatch):
    cfg = TrainConfig(out=str(tmp_path), resume=True)
    with OutLock(tmp_path):  # another run holds --out
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("RANK", "1")
        claim_out(cfg).close()  # a non-zero torchrun rank does not lock
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(ValueError, match="is in use by another run"):
            claim_out(cfg)


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runtime.outdir.fcntl, "flock", no_locks)
    with OutLock(tmp_path):
        pass
    assert "its file system cannot lock files" in capsys.readouterr().err


def test_a_run_leaves_no_lock_file_and_no_empty_out_it_created(tmp_path):
    out = tmp_path / "new"
    claim_out(TrainConfig(out=str(out))).close()  # e.g. a run refused once it held --out
    assert not out.exists()
    kept = tmp_path / "kept"
    (kept / "checkpoints").mkdir(parents=True)
    claim_out(TrainConfig(out=str(kept))).close()
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoints"]  # an --out that was there stays


def test_a_lock_on_a_file_its_holder_deleted_is_taken_again_on_the_new_file(tmp_path, monkeypatch):
    # A contender opened the lock file, then its holder ended (deleting it) before the contender's flock.
    stale = os.open(tmp_path / runtime.outdir.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    (tmp_path / runtime.outdir.LOCK_NAME).unlink()
    opened = iter([stale])
    real = OutLock._open_and_lock
    monkeypatch.setattr(OutLock, "_open_and_lock", lambda self: next(opened, None) or real(self))
    with OutLock(tmp_path) as held:
        assert os.fstat(held._fd).st_ino == os.stat(tmp_path / runtime.outdir.LOCK_NAME).st_ino
        with pytest.raises(ValueError, match="is in use by another run"):  # so a third run is refused
            OutLock(tmp_path).__enter__()


# Temp files of killed checkpoint writers.

def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_opening_out_removes_dead_writers_temp_files_only(tmp_path):
    folder = tmp_path / "checkpoints"
    CheckpointDir(folder, keep=3).save(1, {"step": 1})
    # A writer killed mid-write, through atomic_write's own temp naming.
    script = ("import os, sys; from pathlib import Path; from foundation.atomic_files import temp_path; "
              "temp_path(Path(sys.argv[1])).write_bytes(b'x' * 1000); os._exit(9)")
    subprocess.run([sys.executable, "-c", script, str(folder / "ckpt-000000002.pt")], check=False, timeout=TIMEOUT)
    [killed] = [p for p in folder.iterdir() if ".tmp-" in p.name]
    host, pid = socket.gethostname(), dead_pid()
    legacy = folder / f".ckpt-000000003.pt.tmp-{pid}"  # named before the host was added
    live = folder / f".ckpt-000000004.pt.tmp-{host}-{os.getpid()}"
    elsewhere = folder / f".ckpt-000000005.pt.tmp-{host}x-{pid}"  # another machine on a shared disk
    exported = tmp_path / f".backbone.pt.tmp-{host}-{pid}"
    for path in (legacy, live, elsewhere, exported):
        path.write_bytes(b"x")
    claim_out(TrainConfig(out=str(tmp_path), resume=True)).close()
    assert sorted(p.name for p in folder.iterdir()) == sorted(["ckpt-000000001.pt", live.name, elsewhere.name])
    assert not killed.exists() and not exported.exists()
