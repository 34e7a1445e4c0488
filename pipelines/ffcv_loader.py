"""FFCV two-view loader: each JPEG is decoded once on the CPU, cropped twice, and the photometric
augmentations of both views run batched on the device (pipelines/gpu_augment.py).

    loader = build_loader(LoaderConfig(data="train.beton", batch_size=256, device=torch.device("cuda")))

Per batch: `TwoCropDecoder` (numba, parallel over samples) -> (B, 2, res, res, 3) uint8 ->
ToTensor -> ToDevice(non_blocking) -> `TwoViewAugment` -> (view1, view2, labels) per
pipelines/base.py. Create the .beton with `python -m datasources.ffcv_convert`.

Sharding: every rank gets the shard `DistributedSampler(num_replicas=cfg.world_size,
rank=cfg.rank, seed=cfg.seed)` would give it. FFCV's own `distributed=True` builds that sampler
from torch.distributed's process group; taking rank and world size from the config instead gives
the same partition without needing an initialized group (and works in tests). Orders: 'random'
(default), 'sequential' (file order, for evaluation and feature extraction) and 'quasi_random'
(FFCV's QUASI_RANDOM without the OS page cache, for datasets larger than RAM; single-process only,
as in FFCV; chosen by `LoaderConfig.in_memory=False`, i.e. `train.py --no-in-memory`).

Inputs are validated before FFCV compiles its pipeline: an error inside a compiled op happens in
FFCV's loader thread and hangs the loop instead of raising.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder
from torch.utils.data import DistributedSampler

import foundation.numba_runtime  # noqa: F401  (numba settings, before FFCV runs: see there)
from foundation.threads import keep_torch_threads
from pipelines.base import Batch, LoaderConfig, seed_from
from pipelines.ffcv_decoder import TwoCropDecoder
from pipelines.gpu_augment import TwoViewAugment

ORDERS = ("random", "sequential", "quasi_random")
CONVERT_HINT = "create one with: python -m datasources.ffcv_convert --src <ImageFolder root> --out <file>.beton"
# FFCV's epoch thread checks its stop event every 0.5 s between batches; a batch decodes in well under this.
EPOCH_THREAD_JOIN_S = 10.0


class ShardedOrder(TraversalOrder):
    """This rank's shard in DistributedSampler's partition, shuffled per (seed, epoch) or in file order.

    FFCV calls a TraversalOrder instance with the loader (`order(loader)`), which binds it here.

    Parameters
    ----------
    rank, world_size: this process's shard (`LoaderConfig.rank`, `LoaderConfig.world_size`).
    seed: DistributedSampler's seed; with the epoch it fixes the shuffle, the same on every rank.
    shuffle: False keeps file order ('sequential').
    """

    def __init__(self, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.indices = np.empty(0, dtype=np.uint64)

    def __call__(self, loader: Loader) -> ShardedOrder:
        self.indices = loader.indices
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        sampler = DistributedSampler(
            self.indices,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=False,
        )
        sampler.set_epoch(epoch)
        return self.indices[np.fromiter(sampler, dtype=np.int64)]


def read_beton(path: str) -> Reader:
    """Open and check a .beton: it must hold an RGBImageField 'image' and an IntField 'label'."""
    if not Path(path).is_file():
        raise ValueError(f"FFCV dataset {path} does not exist; {CONVERT_HINT}")
    try:
        reader = Reader(path)
    except Exception as err:  # ffcv raises assorted errors (AssertionError, IndexError) on bad files
        raise ValueError(
            f"{path} is not a readable .beton file ({type(err).__name__}: {err}); {CONVERT_HINT}"
        ) from err
    kinds = {name: type(handler) for name, handler in reader.handlers.items()}
    if kinds.get("image") is not RGBImageField or kinds.get("label") is not IntField:
        found = ", ".join(f"{n}: {k.__name__}" for n, k in kinds.items())
        raise ValueError(
            f"{path} must have fields image (RGBImageField) and label (IntField), found {found}; "
            f"{CONVERT_HINT}"
        )
    if reader.num_samples == 0:
        raise ValueError(f"{path} holds no samples; {CONVERT_HINT}")
    return reader


def validate(cfg: LoaderConfig, order: str, num_samples: int) -> None:
    """ValueError (one line) for a config FFCV would hang on or give no batch for; `num_samples`: the .beton's."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "quasi_random" and cfg.world_size > 1:
        raise ValueError(
            "quasi_random order is single-process only (as in FFCV); use order='random' with several ranks"
        )
    if cfg.recipe.res < 8:
        raise ValueError(f"crop resolution must be at least 8 pixels, got {cfg.recipe.res}")
    if cfg.workers < 1:
        raise ValueError(f"workers must be at least 1, got {cfg.workers}")
    per_rank = -(-num_samples // cfg.world_size)
    if cfg.drop_last and cfg.batch_size > per_rank:
        raise ValueError(
            f"batch size {cfg.batch_size} is larger than this rank's {per_rank} samples of "
            f"{cfg.data}, so drop_last leaves no batch; lower --batch-size"
        )


class FfcvTwoViewLoader:
    """TwoViewLoader over an FFCV Loader with the decode-once two-crop decoder.

    Parameters
    ----------
    cfg: the loading options; `cfg.data` is the .beton (`read_beton` checks it), `cfg.workers` FFCV's
        decoding threads (at least 1).
    order: 'random', 'sequential' or 'quasi_random' (the module docstring); None picks by `cfg.in_memory`.
    batches_ahead: FFCV's prefetch depth: batches decoded ahead of the one being trained on.
    """

    def __init__(
        self, cfg: LoaderConfig, order: str | None = None, batches_ahead: int = 3
    ) -> None:
        order = order or ("random" if cfg.in_memory else "quasi_random")
        reader = read_beton(cfg.data)
        validate(cfg, order, int(reader.num_samples))
        device = torch.device(cfg.device)
        self.cfg, self.device = cfg, device
        self.decoder = TwoCropDecoder(cfg.recipe, seed=cfg.seed)
        # On the CPU the batch is already where it must be; ToDevice would only add a copy.
        to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
        traversal = (
            OrderOption.QUASI_RANDOM
            if order == "quasi_random"
            else ShardedOrder(cfg.rank, cfg.world_size, cfg.seed, shuffle=order == "random")
        )
        with keep_torch_threads():
            self.loader = Loader(
                cfg.data,
                batch_size=cfg.batch_size,
                num_workers=cfg.workers,
                os_cache=order != "quasi_random",
                order=traversal,
                distributed=False,
                seed=cfg.seed,
                drop_last=cfg.drop_last,
                batches_ahead=batches_ahead,
                pipelines={
                    "image": PipelineSpec("image", decoder=self.decoder, transforms=[ToTensor(), *to_device]),
                    "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device],
                },
            )
        self.augment = TwoViewAugment(cfg.recipe, cfg.dtype, compile=cfg.compile).to(device)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def crops(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of raw (B, 2, res, res, 3) uint8 crops and int labels (before augmentation)."""
        self.decoder.set_epoch(self.loader.next_epoch)
        with keep_torch_threads():
            epoch = iter(self.loader)
        try:
            yield from epoch
        finally:
            # An epoch left early (a run ending mid-epoch, an error): stop FFCV's daemon thread and wait for it.
            # A process that exits while that thread is inside a numba OpenMP loop aborts ("terminate called
            # without an active exception", exit -6) after its work is done.
            stop_epoch_thread(epoch)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.loader.next_epoch
        for batch, (crops, labels) in enumerate(self.crops()):
            view1, view2 = self.augment(crops, generator=self._augment_generator(epoch, batch))
            yield view1, view2, labels.long().view(-1)

    def _augment_generator(self, epoch: int, batch: int) -> torch.Generator:
        """The photometric draws of one batch, seeded by (seed, rank, epoch, batch) alone. torch's global
        generator would make them depend on every draw before: a run resumed mid-epoch, which draws
        and skips the batches it already trained on, would augment the rest differently."""
        return torch.Generator(self.device).manual_seed(seed_from(self.cfg.seed, self.cfg.rank, epoch, batch))


def stop_epoch_thread(epoch: EpochIterator, timeout: float = EPOCH_THREAD_JOIN_S) -> None:
    """Stop FFCV's decoding thread of an epoch left early and wait for it (up to `timeout` seconds). The thread
    reads its stop event only while a batch waits (0.5 s at a time) for room in the full queue; the epoch's
    end-marker waits for room without reading it, so each wait that outlasts that takes one batch out."""
    epoch.close()
    deadline = time.monotonic() + timeout
    while epoch.is_alive() and time.monotonic() < deadline:
        epoch.join(timeout=0.6)
        with contextlib.suppress(Empty):
            epoch.output_queue.get_nowait()


def build_loader(cfg: LoaderConfig, order: str | None = None, batches_ahead: int = 3) -> FfcvTwoViewLoader:
    """This rank's FfcvTwoViewLoader over the .beton `cfg.data`.

    Parameters
    ----------
    cfg: the loading options (`pipelines.base.LoaderConfig`).
    order: 'random', 'sequential' or 'quasi_random'; None picks by `cfg.in_memory`.
    batches_ahead: FFCV's prefetch depth in batches.
    """
    return FfcvTwoViewLoader(cfg, order=order, batches_ahead=batches_ahead)
