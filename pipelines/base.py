"""The contract between loaders and the trainer.

Every loader yields `(view1, view2, labels)` per batch:
- view1, view2: float tensors (B, 3, res, res) on the training device, channels_last memory
  format, normalized with the recipe's mean/std, dtype `LoaderConfig.dtype` (bf16 on CUDA by default).
- labels: int64 tensor (B,) on the same device (class index of the ImageFolder; -1 if unknown).
`len(loader)` is the number of batches per epoch for this rank; `loader.set_epoch(e)` reshuffles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from pipelines.views import BYOL_VIEWS, ViewRecipe

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LoaderConfig:
    """What one rank's loader loads and how: every loader's `build_loader(cfg)` takes one.

    Attributes
    ----------
    data: what the loader reads: an ImageFolder directory (torchvision, dali) or a .beton file (ffcv);
        the synthetic loader ignores it.
    batch_size: samples per batch of this process (the global batch / world_size).
    recipe: the two views' augmentations and output resolution (default: the BYOL recipe).
    device: where the views are delivered (and, for dali and ffcv, augmented).
    dtype: the views' dtype (`models.step.view_dtype`: bf16 on CUDA by default); labels stay int64.
    workers: the loader's worker processes (torchvision; 0 loads in the main process) or decoding
        threads (dali, ffcv: at least 1).
    seed: the run's seed; each loader mixes it with the rank and epoch for its shuffling and augmentation.
    rank, world_size: this process's shard of the samples: rank in [0, world_size).
    drop_last, compile, in_memory: see the comments below.
    """

    data: str
    batch_size: int  # per process
    recipe: ViewRecipe = field(default_factory=lambda: BYOL_VIEWS)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    workers: int = 2
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    # Drop the last partial batch: BYOL's BN statistics and LARS trust ratios want full batches.
    drop_last: bool = True
    # torch.compile the loader's own torch augmentation code (ffcv's on-device TwoViewAugment).
    compile: bool = False
    # ffcv: the .beton fits in RAM (random order, read through the OS page cache). False: FFCV's
    # QUASI_RANDOM order without the page cache, for datasets larger than RAM (one process only).
    in_memory: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")


class TwoViewLoader(Protocol):
    """What the trainer iterates (the module docstring has the batch contract).

    `len(loader)`: full batches per epoch for this rank. `set_epoch(epoch)`: call before iterating
    epoch `epoch` (0-based); it reshuffles the shard and reseeds the augmentation for that epoch.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def seed_from(*keys: int) -> int:
    """A 63-bit seed (torch.manual_seed takes it) mixed from non-negative `keys`, e.g. (seed, epoch,
    sample): random draws keyed this way do not depend on what was drawn before them."""
    high, low = np.random.SeedSequence(list(keys)).generate_state(2)
    return (int(high) << 32 | int(low)) >> 1


class LoaderUnavailable(RuntimeError):
    """A loader's optional dependency is missing; the message says which extra to install."""
