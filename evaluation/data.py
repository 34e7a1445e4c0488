"""Labelled evaluation sets: un-augmented uint8 images with their labels, in batches.

    train, test = eval_splits("fashion-mnist")        # the built-in dataset's train and test splits
    train, test = eval_splits("data/train", "data/val")  # two ImageFolder trees

Images stay uint8 (N, C, H, W) until they reach the device; features.py resizes and normalizes
them there, so the sets carry no transform of their own.

Folder sets decode with datasources.imagefolder.open_rgb (the pixels every loader trains on), and a
validation folder's classes are matched to the training folder's by name: a validation class the
training folder lacks is refused in one line naming it. A file that fails to load during the run is
replaced by a mid-grey image (every rank reads the labels from the sample list, so no sample can
drop out) with a warning naming it; `FolderSet.skipped` lists them.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator
from typing import Self

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from datasources.builtin import parse_builtin
from datasources.fashion_mnist import CLASSES, load_fashion_mnist
from datasources.imagefolder import SkipLog, Unreadable, announce, load_index, read_rgb
from foundation.signals import ignore_stop_signals

LabelledBatch = tuple[torch.Tensor, torch.Tensor]
# Standard linear-eval geometry for photos: resize the short side to res / 0.875, centre-crop res.
CENTER_CROP_FRACTION = 0.875


class _Subsettable:
    """`limit` and `shard` for a set that can take a subset by index (its order kept)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def subset(self, indices: torch.Tensor) -> Self:
        raise NotImplementedError

    def limit(self, count: int | None) -> Self:
        """`count` samples spread evenly over the set (all of it if None or larger); on a class-sorted
        folder every class keeps its share."""
        if count is None or count >= len(self):
            return self
        return self.subset(evenly_spaced(len(self), count))

    def shard(self, rank: int, world_size: int) -> Self:
        """Samples rank, rank + world_size, ...: the shards of all ranks are disjoint, cover the set, and
        differ in size by at most one (see evaluation.distributed for how they are put back in order)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        return self.subset(torch.arange(len(self))[rank::world_size])


class ArraySet(_Subsettable):
    """An in-memory labelled set (the built-in dataset, or any uint8 array).

    Parameters
    ----------
    images: uint8 (N, H, W) grayscale or (N, C, H, W) with C in {1, 3}; a numpy array is copied.
    labels: (N,) class indices in [0, num_classes).
    num_classes: the number of classes (the kNN vote's and the probe's width).
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int):
        # A copy of numpy input: the idx reader hands out read-only buffers, which torch cannot wrap.
        images = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images
        self.images = images[:, None] if images.ndim == 3 else images  # grayscale (N, H, W) -> (N, 1, H, W)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.num_classes = num_classes
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor | np.ndarray) -> ArraySet:
        indices = torch.as_tensor(indices)
        return ArraySet(self.images[indices], self.labels[indices], self.num_classes)

    def batches(self, batch_size: int, res: int) -> Iterator[LabelledBatch]:
        """(uint8 images, int64 labels) in order, `batch_size` at a time; `res` is unused (the images are
        resized on the device, `evaluation.features.prepare`)."""
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


# What a file that failed to load is replaced by: mid-grey, the mean of no class.
STAND_IN_GREY = 128


class _CenterCropped(Dataset):
    """Sample i -> (uint8 (3, res, res) centre crop, label, '' or why the file was replaced)."""

    def __init__(self, samples: list[tuple[str, int]], res: int):
        self.samples, self.res = samples, res
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize(round(res / CENTER_CROP_FRACTION), antialias=True),
                                     v2.CenterCrop(res)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.samples[i]
        rgb = read_rgb(path)
        if isinstance(rgb, Unreadable):
            return torch.full((3, self.res, self.res), STAND_IN_GREY, dtype=torch.uint8), label, rgb.reason
        return self.transform(rgb), label, ""


class FolderSet(_Subsettable):
    """An ImageFolder tree decoded on the fly (too large to hold in memory), centre-cropped to res."""

    def __init__(self, root: str, workers: int | None = None, classes: list[str] | None = None,
                 role: str = "eval data"):
        """Scan `root` and label its samples by class name.

        Parameters
        ----------
        root: the ImageFolder root (`datasources.imagefolder.load_index` scans it; skipped files are warned about).
        workers: DataLoader decode processes of `batches` (0: in this process; None: one per usable core).
        classes: the training folder's, which this set's labels must follow by name (the set is then
            `--val-data` in the error for a class that list lacks); None: its own class folders.
        role: starts its start-up line (e.g. 'eval train').
        """
        index = load_index(root, role=role)
        self.classes = classes or index.classes
        self.samples = _relabelled(index.samples, index.classes, self.classes, f"--val-data {root}")
        self.num_classes = len(self.classes)
        # As many decode processes as this process may use cores: more only contend (and torch warns).
        self.workers = len(os.sched_getaffinity(0)) if workers is None else workers
        self.runtime_skips = SkipLog()

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the files replaced by a grey image because they failed to load."""
        return self.runtime_skips.skipped

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,), read from the folder names: no image is decoded."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def subset(self, indices: torch.Tensor | np.ndarray) -> FolderSet:
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in torch.as_tensor(indices).tolist()]
        return subset

    def batches(self, batch_size: int, res: int) -> Iterator[LabelledBatch]:
        """(uint8 (B, 3, res, res), int64 labels) in order: short side resized to res / 0.875, centre crop
        res x res; a file that fails to load is a grey image, warned about and listed in `skipped`."""
        dataset = _CenterCropped(self.samples, res)
        for start, (images, labels, reasons) in zip(itertools.count(0, batch_size), DataLoader(
                dataset, batch_size=batch_size, num_workers=self.workers,
                # A signal to the process group must reach the trainer, which stops cleanly, not kill
                # the workers under it.
                worker_init_fn=ignore_stop_signals), strict=False):
            for offset, reason in enumerate(reasons):
                if reason:
                    self.runtime_skips.add(Unreadable(self.samples[start + offset][0],
                                                      f"{reason}; a grey image stands in for it"))
            yield images, labels


def _relabelled(samples: list[tuple[str, int]], own: list[str], classes: list[str],
                where: str) -> list[tuple[str, int]]:
    """`samples` labelled by index in `own` -> labelled by the same class name's index in `classes`."""
    if own == classes:
        return samples
    unknown = sorted(set(own) - set(classes))
    if unknown:
        missing = sorted(set(classes) - set(own))
        raise ValueError(
            f"{where} has class folder(s) the training data lacks: {_names(unknown)}"
            + (f"; the training data has {_names(missing)} instead" if missing else "")
            + ": the class folders of both must have the same names")
    position = {name: index for index, name in enumerate(classes)}
    return [(path, position[own[label]]) for path, label in samples]


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


EvalSet = ArraySet | FolderSet


def evenly_spaced(total: int, count: int) -> torch.Tensor:
    return torch.linspace(0, total - 1, count).round().long()


def eval_splits(
    data: str, val_data: str | None = None, train_limit: int | None = None, test_limit: int | None = None,
    workers: int | None = None,
) -> tuple[EvalSet, EvalSet]:
    """(train, test) sets for `--data`: the built-in dataset's splits, or two ImageFolder roots
    decoded by `workers` DataLoader processes (0: in this process; None: one per usable core).

    The limits keep that many evenly spaced samples of each (features of all 70k Fashion-MNIST
    images take minutes on a CPU; a few thousand give a usable monitor).

    Parameters
    ----------
    data: --data: 'fashion-mnist[:folder]' (its train and test idx splits) or an ImageFolder root.
    val_data: --val-data, the labelled ImageFolder scored on; required when `data` is a folder
        (ValueError otherwise), ignored for the built-in dataset. Its classes are matched to data's by name.
    train_limit, test_limit: keep at most this many evenly spaced samples of each set (None: all).
    workers: decode processes of folder sets (`FolderSet`).
    """
    idx_folder = parse_builtin(data)
    if idx_folder is None and val_data is None:
        raise ValueError(f"--data {data} is a folder: also give --val-data, the labelled folder to report on")
    if idx_folder is None:
        train = FolderSet(data, workers, role="eval train")  # each folder's scan prints its own line
        test = FolderSet(val_data, workers, classes=train.classes, role="eval test")
        return train.limit(train_limit), test.limit(test_limit)
    sets = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        whole = ArraySet(*load_fashion_mnist(split, idx_folder), len(CLASSES))
        sets.append(whole.limit(limit))
        used = f"{len(sets[-1]):,} of {len(whole):,}" if len(sets[-1]) < len(whole) else f"{len(whole):,}"
        announce(f"eval {split}: {used} images in {len(CLASSES)} classes of Fashion-MNIST {split} ({idx_folder})")
    return sets[0], sets[1]
