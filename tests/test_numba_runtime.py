"""numba settings made before FFCV runs (foundation/numba_runtime.py): no thread-pool warning at forks,
no finaliser-race noise on the console."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.registry import is_available

REPO = Path(__file__).resolve().parents[1]

FORK_WHILE_DECODING = """
import os, sys
from pipelines.base import LoaderConfig
from datasources.ffcv_convert import main as convert
from pipelines.registry import build_loader
from pipelines.views import BYOL_VIEWS

beton = sys.argv[2]
assert convert(["--src", sys.argv[1], "--out", beton, "--workers", "1"]) == 0
loader = build_loader("ffcv", LoaderConfig(data=beton, batch_size=4, recipe=BYOL_VIEWS.with_overrides(res=32),
                                           workers=2))
batches = iter(loader)
next(batches)
for _ in range(3):  # forks while FFCV's thread decodes ahead, as torch.compile's C++ builds do
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    next(batches)
# Leave the epoch as train.py does (its finally stops FFCV's thread): a process that exits while that thread is
# inside a numba loop aborts (-6, "terminate called without an active exception"), 1 run in 3 without this.
batches.close()
import numba
print("layer", numba.threading_layer())
"""


@pytest.mark.slow
@pytest.mark.skipif(not is_available("ffcv"), reason="ffcv is not installed")
def test_forking_while_ffcv_decodes_prints_no_numba_thread_warning(photo_corpus: str, tmp_path: Path) -> None:
    """numba's TBB pool printed "Unable to join threads to shut down before fork()" at every fork made
    while FFCV's loader thread was decoding (this machine has TBB, so the old default was TBB)."""
    proc = subprocess.run([sys.executable, "-c", FORK_WHILE_DECODING, photo_corpus, str(tmp_path / "c.beton")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Unable to join threads" not in proc.stderr + proc.stdout
    if _has_openmp_pool():
        assert "layer omp" in proc.stdout


def _has_openmp_pool() -> bool:
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        return False
    return True


def _raise_from(filename: str, exc: BaseException):
    """The exception with a traceback whose innermost frame is in `filename`."""
    try:
        exec(compile("raise exc", filename, "exec"), {"exc": exc})
    except BaseException as raised:  # noqa: BLE001
        return raised


def test_only_numbas_finaliser_race_is_dropped(monkeypatch) -> None:
    """numba's dispatcher finaliser printed "Exception ignored ... KeyError: (Array(uint8, ...), ...)" when
    an FFCV loader was dropped mid-compile; that message is dropped, any other unraisable still reaches
    the previous hook."""
    import os
    import types

    import foundation.numba_runtime as numba_runtime

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    numba_runtime.drop_finaliser_race_messages()
    dispatcher = os.path.join("site-packages", "numba", "core", "dispatcher.py")
    race = _raise_from(dispatcher, KeyError("(Array(uint8, 1, 'C'),)"))
    elsewhere = _raise_from(os.path.join("site-packages", "mylib", "cache.py"), KeyError("k"))
    other_type = _raise_from(dispatcher, RuntimeError("a real numba failure"))
    for exc in (race, elsewhere, other_type):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                                 err_msg=None, object=None))
    assert seen == [elsewhere, other_type]
