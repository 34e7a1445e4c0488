"""The baseline users would otherwise pick: PIL decode + torchvision.transforms.v2 in DataLoader workers.

Each image is decoded once (PIL, converted to RGB) and both views are built from that decode with
the per-sample transforms of the recipe; the batch is then moved to `cfg.device`, made channels_last
and cast to `cfg.dtype` in the main process. Same sample list and bad-file policy as every loader
(pipelines/imagefolder.py).

Epochs: a seeded permutation per (seed, epoch), strided over ranks like torch's DistributedSampler
but without its padding, so each sample is seen exactly once per epoch across ranks; `drop_last`
drops each rank's last partial batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from pipelines.base import Batch, LoaderConfig
from pipelines.imagefolder import ImageFolderIndex, load_index
from pipelines.views import ViewRecipe, ViewSpec


def view_transform(recipe: ViewRecipe, spec: ViewSpec) -> v2.Compose:
    """PIL image -> normalized float32 CHW tensor for one view; every parameter drawn per call."""
    # x >= t on the [0, 1] scale is x >= ceil(255 t) on uint8; PIL's solarize inverts x >= threshold.
    threshold = math.ceil(spec.solarize_threshold * 255)
    jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    return v2.Compose([
        v2.RandomResizedCrop(recipe.res, scale=recipe.crop_scale, ratio=recipe.crop_ratio,
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
        v2.RandomApply([jitter], p=spec.jitter_p),
        v2.RandomGrayscale(spec.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(recipe.blur_kernel_size, sigma=spec.blur_sigma)], p=spec.blur_p),
        v2.RandomSolarize(threshold, p=spec.solarize_p),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(recipe.mean, recipe.std),
    ])


class TwoViewImageFolder(Dataset):
    """Sample i -> (view1, view2, label) from one decode of the image."""

    def __init__(self, index: ImageFolderIndex, recipe: ViewRecipe):
        self.samples = index.samples
        self.transforms = tuple(view_transform(recipe, spec) for spec in recipe.views)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        view1, view2 = (transform(rgb) for transform in self.transforms)
        return view1, view2, label


class ShardSampler(Sampler[int]):
    """A (seed, epoch)-seeded permutation, strided over ranks; every index exactly once across ranks."""

    def __init__(self, size: int, rank: int, world_size: int, seed: int):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return iter(order[self.rank::self.world_size].tolist())


class TorchvisionTwoViewLoader:
    """Iterates (view1, view2, labels) on `cfg.device`; `bad_files` lists the skipped files."""

    def __init__(self, cfg: LoaderConfig, index: ImageFolderIndex):
        self.cfg = cfg
        self.index = index
        self.bad_files = index.bad_files
        self.sampler = ShardSampler(len(index.samples), cfg.rank, cfg.world_size, cfg.seed)
        self.loader = DataLoader(
            TwoViewImageFolder(index, cfg.recipe), batch_size=cfg.batch_size, sampler=self.sampler,
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0, drop_last=cfg.drop_last,
            pin_memory=cfg.device.type == "cuda",
            # Per-rank worker seeds, so ranks draw different augmentations for their samples.
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + cfg.rank),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        device, dtype = self.cfg.device, self.cfg.dtype
        for view1, view2, labels in self.loader:
            yield (
                view1.to(device, non_blocking=True).to(dtype, memory_format=torch.channels_last),
                view2.to(device, non_blocking=True).to(dtype, memory_format=torch.channels_last),
                labels.to(device, non_blocking=True),
            )


def build_loader(cfg: LoaderConfig) -> TorchvisionTwoViewLoader:
    index = load_index(cfg.data)
    return TorchvisionTwoViewLoader(cfg, index)
