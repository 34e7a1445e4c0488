"""numba's process-wide settings for FFCV, made before FFCV's first parallel loop fixes them.

- Thread pool: FFCV decodes and writes in numba parallel loops. numba's TBB pool (its default where
  TBB is installed) prints "Unable to join threads to shut down before fork()" whenever the process
  forks while a loop runs on another thread (FFCV's loader thread decoding ahead while torch.compile
  builds C++ or DataLoader workers start), and may leave the child's threading broken. The OpenMP
  pool is thread-safe and decodes as fast. A NUMBA_THREADING_LAYER the user set wins, and without an
  OpenMP runtime numba keeps its own choice.
- Finaliser noise: when an FFCV loader is dropped (or the process exits) while its thread still
  compiles or runs pipeline code, numba's dispatcher finaliser can find the dispatcher's overloads
  changing under its loop and Python prints "Exception ignored in: <finalize object ...>" with a
  `KeyError: (Array(uint8, 1, 'C', ...), ...)`. The finaliser only releases compiled code that is being
  discarded anyway; exactly that message is dropped, every other unraisable exception still prints.
Import this module before anything runs FFCV code.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

import numba

NUMBA_DISPATCHER = os.path.join("numba", "core", "dispatcher.py")


def prefer_openmp_threads() -> None:
    if "NUMBA_THREADING_LAYER" in os.environ:  # the user's (or an earlier call's) choice
        return
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (importable only with an OpenMP runtime)
    except ImportError:
        return
    # In the environment too: numba re-reads its configuration from it whenever a NUMBA_* variable
    # changes, and child processes inherit the choice.
    os.environ["NUMBA_THREADING_LAYER"] = "omp"
    numba.config.THREADING_LAYER = "omp"


def is_finaliser_race(exc: BaseException | None, tb: TracebackType | None) -> bool:
    """A KeyError raised inside numba's dispatcher module (its finaliser's loop over the overloads)."""
    if not isinstance(exc, KeyError) or tb is None:
        return False
    return traceback.extract_tb(tb)[-1].filename.endswith(NUMBA_DISPATCHER)


def drop_finaliser_race_messages() -> None:
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not is_finaliser_race(unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    sys.unraisablehook = hook


prefer_openmp_threads()
drop_finaliser_race_messages()
