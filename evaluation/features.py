"""Frozen-encoder features of a labelled set: eval mode (BN running statistics), no grad, no augmentation.

Images arrive as uint8 batches; on the device they are scaled to [0, 1], given 3 channels if gray,
resized to `res` if needed and normalized with the recipe's mean/std, i.e. the views' geometry and
statistics without the random augmentations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.data import ArraySet, EvalSet
from pipelines.views import BYOL_VIEWS, ViewRecipe

DEFAULT_BATCH_SIZE = 512


def prepare(images: torch.Tensor, res: int, recipe: ViewRecipe, device: torch.device) -> torch.Tensor:
    """uint8 (B, C, H, W), C in {1, 3} -> normalized float32 (B, 3, res, res), channels_last, on `device`.

    Images of another size are resized (bilinear, antialiased, aspect ratio not kept); `recipe` gives
    the mean and std.
    """
    x = images.to(device, non_blocking=True).float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (res, res):
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no grad inside; the module's previous mode is restored after (mid-training calls)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data: EvalSet,
    device: torch.device | str,
    res: int | None = None,
    recipe: ViewRecipe = BYOL_VIEWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D), labels int64 (N,)), both on `device`. `res` defaults to the recipe's.

    Parameters
    ----------
    encoder: the backbone, (B, 3, res, res) -> (B, D); run in eval mode without grad, its mode restored
        after. On CUDA it runs under bf16 autocast.
    data: the labelled set, read in order.
    device: where the encoder is and the features go.
    res: the side in pixels the images reach the encoder at (folders are centre-cropped to it, arrays resized).
    recipe: its mean and std normalize the images (`prepare`); no augmentation.
    batch_size: images per encoder call.
    """
    device = torch.device(device)
    res = res or recipe.res
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    features, labels = [], []
    with frozen(encoder), autocast:
        for images, batch_labels in data.batches(batch_size, res):
            features.append(encoder(prepare(images, res, recipe, device)).float())
            labels.append(batch_labels.to(device))
    return torch.cat(features), torch.cat(labels)


def pixel_features(data: ArraySet) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels in [0, 1] as features (the no-learning baseline): float32 (N, C*H*W), labels; on the
    device of the set's tensors."""
    return data.images.flatten(1).float().div_(255), data.labels
