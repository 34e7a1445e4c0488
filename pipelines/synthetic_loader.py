"""Synthetic views generated on the device: the compute ceiling every real loader is compared to.

A fixed pool of random normalized views is made once on the device; each batch is a slice of it,
so the loader costs nothing per step and the step runs at the speed of the hardware.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipelines.base import Batch, LoaderConfig

SYNTHETIC_EPOCH_SAMPLES = 100_000  # like a mid-size dataset: sets len() and epoch boundaries


class SyntheticLoader:
    """Random normalized views from a pool made once on `cfg.device`; labels are random in [0, 1000).

    Parameters
    ----------
    cfg: the loading options; data and workers are ignored, the pool is seeded with seed + rank.
    samples_per_epoch: the global samples per epoch; len() is samples_per_epoch // (batch_size * world_size)
        (ValueError when that is 0).
    pool_batches: how many distinct (view1, view2) pairs the pool cycles through (pool_batches + 1
        batches are kept on the device).
    """

    def __init__(self, cfg: LoaderConfig, samples_per_epoch: int = SYNTHETIC_EPOCH_SAMPLES, pool_batches: int = 4):
        self.cfg = cfg
        self.batches = samples_per_epoch // (cfg.batch_size * cfg.world_size)
        if self.batches < 1:
            raise ValueError(f"batch {cfg.batch_size} x {cfg.world_size} ranks exceeds {samples_per_epoch} samples")
        generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + cfg.rank)
        shape = (cfg.batch_size, 3, cfg.recipe.res, cfg.recipe.res)
        self.pool = [
            torch.randn(shape, generator=generator, device=cfg.device).to(cfg.dtype, memory_format=torch.channels_last)
            for _ in range(pool_batches + 1)
        ]
        self.labels = torch.randint(0, 1000, (cfg.batch_size,), generator=generator, device=cfg.device)

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle: every epoch replays the same pool."""

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.batches):
            j = i % (len(self.pool) - 1)
            yield self.pool[j], self.pool[j + 1], self.labels


def build_loader(cfg: LoaderConfig) -> SyntheticLoader:
    return SyntheticLoader(cfg)
