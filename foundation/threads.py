"""torch's process-wide intra-op thread count, kept across code that changes it behind the trainer's back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Undo changes to torch's intra-op thread count made inside the block.

    ffcv calls torch.set_num_threads(1) when it is imported and sets it to its worker count when a
    Loader is built and at every epoch; left alone, that silently makes the training step's CPU
    ops single-threaded (ffcv's own decoding threads are numba's and are not affected).
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
