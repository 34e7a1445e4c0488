"""The pipelines a user would pick instead of fastbyol's loaders: the throughput benchmark's baselines.

- `torchvision` is the product's own baseline loader (pipelines/torchvision_loader.py): PIL decode, crop and
  flip, then the recipe's photometric ops on float tensors exactly as the formulas are written, with
  a separable blur.
- `solo-learn` is the same DataLoader, sampler and decode with solo-learn's BYOL transforms: every op
  on the 8-bit PIL image (torchvision's PIL kernels for crop, colour jitter, grayscale, solarize and
  flip; PIL's `ImageFilter.GaussianBlur(radius=sigma)`, a box-filter approximation whose cost does not
  grow with sigma), then ToTensor and Normalize. Its jitter is torchvision's formula on 8-bit values;
  it crops bilinearly as the recipe does (solo-learn's bicubic costs more, and the baseline must be
  the fastest a user would run).
Ratios in the benchmark are taken against the faster of the two (`strongest_baseline`).
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from datasources.imagefolder import load_index
from pipelines.base import LoaderConfig
from pipelines.registry import build_loader
from pipelines.torchvision_loader import TorchvisionTwoViewLoader
from pipelines.views import ViewRecipe, ViewSpec

BASELINES = ("torchvision", "solo-learn")


class PilGaussianBlur:
    """PIL's Gaussian blur with radius (= sigma) ~ U[low, high] per call, from torch's per-worker generator."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(*self.sigma))))


def solo_learn_view_transform(recipe: ViewRecipe, spec: ViewSpec) -> v2.Compose:
    """One view as solo-learn's BYOL pipeline builds it (op order included), on 8-bit PIL images."""
    return v2.Compose([
        v2.RandomResizedCrop(recipe.res, scale=recipe.crop_scale, ratio=recipe.crop_ratio,
                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        v2.RandomGrayscale(spec.grayscale_p),
        v2.RandomApply([PilGaussianBlur(spec.blur_sigma)], p=spec.blur_p),
        v2.RandomSolarize(round(spec.solarize_threshold * 255), p=spec.solarize_p),
        v2.RandomHorizontalFlip(spec.flip_p),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(recipe.mean, recipe.std),
    ])


def build_baseline(name: str, cfg: LoaderConfig) -> TorchvisionTwoViewLoader:
    if name == "torchvision":
        return build_loader("torchvision", cfg)
    if name == "solo-learn":
        return TorchvisionTwoViewLoader(cfg, load_index(cfg.data), transform=solo_learn_view_transform)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def strongest_baseline(loader_images_per_s: dict[str, float]) -> str | None:
    """The fastest measured baseline: every speed-up is quoted against it."""
    measured = {name: ips for name, ips in loader_images_per_s.items() if name in BASELINES}
    return max(measured, key=measured.get) if measured else None
