"""The baseline users would otherwise pick: PIL decode + torchvision.transforms.v2 in DataLoader workers.

Each image is decoded once (datasources.imagefolder.open_rgb: the RGB pixels every loader gets) and both
views are built from that decode with the per-sample transforms of the recipe; the batch is then moved
to `cfg.device`, made channels_last and cast to `cfg.dtype` in the main process. Same sample list and
bad-file policy as every loader (datasources/imagefolder.py). A file that fails to load during the run
(deleted after the scan, a corrupt body behind intact markers) is left out of its batch, which comes
out one sample short, with a warning naming it; `skipped` lists them.

Colour jitter is the recipe's mode (pipelines/views.py) exactly: v2.ColorJitter for "torchvision",
`OfficialColorJitter` for "official", both on float images after the PIL crop and flip, the four
ops in a random order per call and each clipped, so this loader is also the reference the fast
loaders' approximations are measured against (tests/test_jitter_fidelity.py).

Epochs: a seeded permutation per (seed, epoch), strided over ranks like torch's DistributedSampler
but without its padding, so each sample is seen exactly once per epoch across ranks; `drop_last`
drops each rank's last partial batch. A sample's augmentations are drawn from torch's generator
seeded by (seed, epoch, sample index) alone (`EpochSeeded`), not from a worker's running stream:
they do not depend on the worker count, on which worker got the batch, or on how many batches the
process drew before, so a run resumed mid-epoch draws exactly what an uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from datasources.imagefolder import ImageFolderIndex, SkipLog, Unreadable, load_index, read_rgb
from foundation.signals import ignore_stop_signals
from pipelines.base import Batch, LoaderConfig, seed_from
from pipelines.gpu_augment import blur_matrices, gaussian_kernels, hsv_saturation
from pipelines.views import ViewRecipe, ViewSpec


def _draw(low: float, high: float) -> float:
    """One value ~ U[low, high] from torch's generator (seeded per DataLoader worker), as v2.ColorJitter draws."""
    return float(torch.empty(1).uniform_(low, high))


class OfficialColorJitter(nn.Module):
    """The official BYOL colour jitter (formulas in pipelines/views.py) on a float (3, H, W) image in
    [0, 1]: the four ops in a random order, each result clipped to [0, 1], parameters drawn per call.

    Parameters
    ----------
    brightness, contrast, saturation, hue: the op strengths (`ViewSpec`); an op of strength 0 is skipped.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float) -> None:
        super().__init__()
        self.strengths = (brightness, contrast, saturation, hue)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        ops = (self._brightness, self._contrast, self._saturation, self._hue)
        for i in torch.randperm(4).tolist():
            if self.strengths[i] > 0:
                img = ops[i](img, self.strengths[i])
        return img

    @staticmethod
    def _brightness(img: torch.Tensor, strength: float) -> torch.Tensor:
        return (img + _draw(-strength, strength)).clamp_(0.0, 1.0)

    @staticmethod
    def _contrast(img: torch.Tensor, strength: float) -> torch.Tensor:
        mean = img.mean(dim=(-2, -1), keepdim=True)  # each channel's own
        return mean.add(img - mean, alpha=_draw(max(0.0, 1 - strength), 1 + strength)).clamp_(0.0, 1.0)

    @staticmethod
    def _saturation(img: torch.Tensor, strength: float) -> torch.Tensor:
        return hsv_saturation(img, _draw(max(0.0, 1 - strength), 1 + strength), dim=-3)

    @staticmethod
    def _hue(img: torch.Tensor, strength: float) -> torch.Tensor:
        return v2.functional.adjust_hue(img, _draw(-strength, strength))  # exact HSV, as the official code


class SeparableGaussianBlur(nn.Module):
    """v2.GaussianBlur's result (same kernel, sigma ~ U[low, high] per call, reflect padding) on a float
    (C, H, W) image, as a row pass and a column pass instead of a dense k x k convolution.

    The dense 23 x 23 kernel costs 529 multiply-adds a pixel and made torchvision's blur about twice as
    slow as the PIL `ImageFilter.GaussianBlur` that solo-learn's BYOL pipeline uses; the baseline must be
    the fastest faithful pipeline a user would pick. Each pass is one matmul with a banded matrix
    (gpu_augment's `blur_matrices`, shared so both loaders blur with the same kernel and padding).

    Parameters
    ----------
    kernel_size: taps of the 1-D kernel, odd (`ViewRecipe.blur_kernel_size`).
    sigma: (low, high) of sigma in pixels (`ViewSpec.blur_sigma`).
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, sigma

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(*self.sigma)  # torch's generator, seeded per DataLoader worker
        kernel = gaussian_kernels(sigma, self.kernel_size, torch.ones(1, dtype=torch.bool))
        height, width = img.shape[-2:]
        rows = blur_matrices(kernel, height)[0]
        cols = rows if width == height else blur_matrices(kernel, width)[0]  # views are square: build once
        return rows @ img @ cols.mT


def colour_jitter(recipe: ViewRecipe, spec: ViewSpec) -> nn.Module:
    """The recipe's jitter mode for float images in [0, 1]."""
    strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
    return v2.ColorJitter(*strengths) if recipe.jitter == "torchvision" else OfficialColorJitter(*strengths)


def view_transform(recipe: ViewRecipe, spec: ViewSpec) -> v2.Compose:
    """PIL image -> normalized float32 CHW tensor for one view; every parameter drawn per call."""
    return v2.Compose([
        v2.RandomResizedCrop(recipe.res, scale=recipe.crop_scale, ratio=recipe.crop_ratio,
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
        # The photometric ops run on float values: the jitter formulas are defined on [0, 1] without
        # rounding to 8 bits between ops, which torchvision's PIL kernels do after every op.
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([colour_jitter(recipe, spec)], p=spec.jitter_p),
        v2.RandomGrayscale(spec.grayscale_p),
        v2.RandomApply([SeparableGaussianBlur(recipe.blur_kernel_size, spec.blur_sigma)], p=spec.blur_p),
        v2.RandomSolarize(spec.solarize_threshold, p=spec.solarize_p),
        v2.Normalize(recipe.mean, recipe.std),
    ])


# Builds one view's transform (PIL image -> normalized float tensor); None: `view_transform`.
ViewTransform = Callable[[ViewRecipe, ViewSpec], Callable[[Image.Image], torch.Tensor]] | None


class TwoViewImageFolder(Dataset):
    """Sample i -> (view1, view2, label) from one decode of the image.

    An image that fails to load gives its `Unreadable` instead (`collate_skipping` leaves it out).

    Parameters
    ----------
    index: the scanned ImageFolder (`datasources.imagefolder.load_index`): samples and labels.
    recipe: the two views' specs.
    transform: (recipe, spec) -> the PIL-image-to-tensor transform of one view (default: `view_transform`).
    """

    def __init__(self, index: ImageFolderIndex, recipe: ViewRecipe, transform: ViewTransform = None):
        self.samples = index.samples
        self.transforms = tuple((transform or view_transform)(recipe, spec) for spec in recipe.views)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int] | Unreadable:
        path, label = self.samples[i]
        rgb = read_rgb(path)
        if isinstance(rgb, Unreadable):
            return rgb  # left out of the batch by `collate_skipping`, reported by the main process
        view1, view2 = (transform(rgb) for transform in self.transforms)
        return view1, view2, label


def collate_skipping(samples: list) -> tuple[list | None, list[Unreadable]]:
    """(the collated batch of the samples that loaded, or None if none did; the ones that did not)."""
    failed = [sample for sample in samples if isinstance(sample, Unreadable)]
    loaded = [sample for sample in samples if not isinstance(sample, Unreadable)]
    return (default_collate(loaded) if loaded else None), failed


class EpochSeeded(Dataset):
    """`dataset[index]` for the items (epoch, index) of `ShardSampler`, drawn with torch's generator
    seeded by (seed, epoch, index). The process's own generator state is put back afterwards: with
    --workers 0 this runs in the trainer, whose generator is part of its checkpoints."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_from(self.seed, epoch, index))
            return self.dataset[index]


class ShardSampler(Sampler[tuple[int, int]]):
    """A (seed, epoch)-seeded permutation, strided over ranks; every index exactly once across ranks.
    Yields (epoch, index): `EpochSeeded` seeds each sample's augmentations with both.

    Parameters
    ----------
    size: the dataset's sample count.
    rank, world_size: this process's stride over the permutation (rank in [0, world_size)).
    seed: the run's seed; every rank must pass the same, so the ranks share one permutation per epoch.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return ((self.epoch, index) for index in order[self.rank::self.world_size].tolist())


class TorchvisionTwoViewLoader:
    """Iterates (view1, view2, labels) on `cfg.device`; `bad_files` lists the skipped files.

    Parameters
    ----------
    cfg: the loading options; `cfg.workers` DataLoader worker processes (0: load in this process).
    index: the scanned ImageFolder `cfg.data` (`datasources.imagefolder.load_index`).
    transform: (recipe, spec) -> one view's PIL-image-to-tensor transform (default: `view_transform`).
    """

    def __init__(self, cfg: LoaderConfig, index: ImageFolderIndex, transform: ViewTransform = None):
        self.cfg = cfg
        self.index = index
        self.bad_files = index.bad_files
        self.runtime_skips = SkipLog()
        self.sampler = ShardSampler(len(index.samples), cfg.rank, cfg.world_size, cfg.seed)
        self.loader = DataLoader(
            EpochSeeded(TwoViewImageFolder(index, cfg.recipe, transform), cfg.seed), batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0, drop_last=cfg.drop_last,
            pin_memory=cfg.device.type == "cuda", collate_fn=collate_skipping,
            # Workers' base seeds (augmentations are seeded per sample by EpochSeeded) from the run's seed,
            # not from the trainer's generator.
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + cfg.rank),
            worker_init_fn=ignore_stop_signals,  # a signal to the process group must reach only the trainer
        )

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of the files that failed to load during the run, in the order met."""
        return self.runtime_skips.skipped

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        device, dtype = self.cfg.device, self.cfg.dtype
        for batch, failed in self.loader:
            for item in failed:
                self.runtime_skips.add(item)
            if batch is None:
                continue
            view1, view2, labels = batch
            yield (
                view1.to(device, non_blocking=True).to(dtype, memory_format=torch.channels_last),
                view2.to(device, non_blocking=True).to(dtype, memory_format=torch.channels_last),
                labels.to(device, non_blocking=True),
            )


def build_loader(cfg: LoaderConfig) -> TorchvisionTwoViewLoader:
    """This rank's TorchvisionTwoViewLoader over the ImageFolder `cfg.data` (scanned or read from its index)."""
    index = load_index(cfg.data)
    return TorchvisionTwoViewLoader(cfg, index)
