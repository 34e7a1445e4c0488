"""numba's thread pool for FFCV, chosen before FFCV's first parallel loop fixes it for the process.

FFCV decodes and writes in numba parallel loops. numba's TBB pool (its default where TBB is installed)
prints "Unable to join threads to shut down before fork()" whenever the process forks while a loop
runs on another thread (FFCV's loader thread decoding ahead while torch.compile builds C++ or
DataLoader workers start), and may leave the child's threading broken. The OpenMP pool is thread-safe
and decodes as fast. A NUMBA_THREADING_LAYER the user set wins, and without an OpenMP runtime numba
keeps its own choice. Import this module before anything runs FFCV code.
"""

from __future__ import annotations

import os

import numba


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


prefer_openmp_threads()
