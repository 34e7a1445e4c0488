"""Batched per-sample photometric augmentations of both BYOL views, on whatever device the crops live.

    augment = TwoViewAugment(recipe, dtype=torch.bfloat16).to(device)
    view1, view2 = augment(crops1_u8, crops2_u8)    # or augment(stacked_u8) with shape (B, 2, H, W, 3)

Every random parameter is drawn per sample on the device in one `torch.rand` call per view; no
value ever comes back to the host (no `.item()`, no Python branching on tensor values), so the
module runs asynchronously on CUDA and compiles with torch.compile.

Choices (the recipe allows them; see pipelines/views.py):
- Colour jitter: the four ops run in a random order per sample. Brightness, contrast, saturation
  and hue are all affine maps of the RGB vector (contrast through the per-image gray mean, which
  an affine map carries along exactly), so each sample's ordered chain composes into ONE 3x4
  matrix that is applied in a single pass. The result is clamped to [0, 1] once at the end of the
  chain instead of after every op (DALI's fused colour twist does the same).
- Hue is the YIQ rotation approximation (rotate the I/Q chroma plane by 2*pi*h), not an exact
  RGB->HSV->RGB round trip; it is linear, which is what makes the fused matrix possible.
- Blur: separable Gaussian with per-sample sigma, reflect padding (as torchvision), applied as two
  batched matmuls with per-sample banded matrices; samples that skip the blur get a delta kernel
  (identity matrix), so one code path serves the whole batch. The horizontal flip is folded into
  the column matrix (exact: a flip commutes with every per-pixel op).
- Working layout (B, H, 3, W): both blur passes and the colour mix are then plain batched matmuls
  with no per-channel copies, and the output needs one copy into channels_last.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from pipelines.views import ViewRecipe, ViewSpec

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))

# Columns of the per-sample uniform draws (one torch.rand(B, _DRAWS) per view).
_FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(10)
_ORDER = slice(10, 14)  # four keys whose argsort is the jitter order
_DRAWS = 14


def _as_row_planes(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float32 (B, H, 3, W) on the 0-255 scale, contiguous.

    In this layout both blur passes are plain batched matmuls: the row pass multiplies (B, H, H) by
    the (B, H, 3W) view, the column pass multiplies the (B, 3H, W) view by (B, W, W). Neither
    broadcasts over channels, so no operand is copied per channel.
    """
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"expected uint8 crops (B, H, W, 3) or (B, 3, H, W), got shape {tuple(x.shape)}")
    planes = x.permute(0, 1, 3, 2) if x.shape[-1] == 3 and x.shape[1] != 3 else x.permute(0, 2, 1, 3)
    return planes.to(torch.float32, memory_format=torch.contiguous_format)


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


class ColourBasis(NamedTuple):
    """Constant colour matrices, made once on the host and kept on the device: building them per
    batch would copy from pageable host memory (and `linalg.inv` checks its result on the host),
    three host syncs per view on CUDA."""

    gray: torch.Tensor  # (3,) luma weights
    yiq: torch.Tensor  # (3, 3) RGB -> YIQ
    yiq_inv: torch.Tensor  # (3, 3) YIQ -> RGB

    @classmethod
    def build(cls, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ColourBasis:
        yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
        return cls(*(t.to(device, dtype) for t in (torch.tensor(GRAY_WEIGHTS, dtype=torch.float64), yiq,
                                                      torch.linalg.inv(yiq))))


def _hue_matrix(theta: torch.Tensor, basis: ColourBasis) -> torch.Tensor:
    """(B,) angles -> (B, 3, 3) RGB matrices rotating the YIQ chroma plane."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(theta), torch.zeros_like(theta)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(-1, 3, 3)
    return basis.yiq_inv @ rot @ basis.yiq


def jitter_matrices(u: torch.Tensor, mean_rgb: torch.Tensor, spec: ViewSpec, basis: ColourBasis) -> torch.Tensor:
    """Per-sample (B, 3, 4) affine colour maps of the whole jitter chain, in random order per sample.

    u: (B, _DRAWS) uniforms; mean_rgb: (B, 3) mean colour of each input image; `basis` on u's device.
    """
    batch, device, dtype = u.shape[0], u.device, u.dtype
    eye = torch.eye(4, device=device, dtype=dtype).expand(batch, 4, 4)
    gray = basis.gray
    gray_rows = gray.expand(3, 3)  # every output channel = luma
    bright = _uniform(u[:, _BRIGHT], max(0.0, 1 - spec.brightness), 1 + spec.brightness)
    contrast = _uniform(u[:, _CONTRAST], max(0.0, 1 - spec.contrast), 1 + spec.contrast)
    sat = _uniform(u[:, _SAT], max(0.0, 1 - spec.saturation), 1 + spec.saturation)
    hue = _uniform(u[:, _HUE], -spec.hue, spec.hue) * (2 * math.pi)

    def linear(m3: torch.Tensor) -> torch.Tensor:
        out = eye.clone()
        out[:, :3, :3] = m3
        return out

    eye3 = torch.eye(3, device=device, dtype=dtype)
    bright_m = linear(bright.view(-1, 1, 1) * eye3)
    sat_m = linear(sat.view(-1, 1, 1) * eye3 + (1 - sat).view(-1, 1, 1) * gray_rows)
    hue_m = linear(_hue_matrix(hue, basis))
    order = u[:, _ORDER].argsort(dim=1)  # (B, 4): op index (bright, contrast, sat, hue) at each step
    op_ids = torch.arange(4, device=device)
    total = eye
    mean_h = torch.cat([mean_rgb, torch.ones_like(mean_rgb[:, :1])], dim=1).unsqueeze(-1)  # (B, 4, 1)
    for step in range(4):
        # Contrast blends with the gray mean of the image as it is at this step of the chain.
        current_gray = (gray @ (total @ mean_h)[:, :3]).squeeze(-1)  # (B,)
        contrast_m = linear(contrast.view(-1, 1, 1) * eye3)
        contrast_m[:, :3, 3] = ((1 - contrast) * current_gray).unsqueeze(-1)
        ops = torch.stack([bright_m, contrast_m, sat_m, hue_m], dim=1)  # (B, 4, 4, 4)
        # A comparison, not F.one_hot: one_hot checks its input's range on the host (two syncs).
        pick = (order[:, step].unsqueeze(1) == op_ids).to(dtype).view(batch, 4, 1, 1)
        total = (ops * pick).sum(dim=1) @ total
    applied = (u[:, _JITTER] < spec.jitter_p).view(-1, 1, 1)
    return torch.where(applied, total, eye)[:, :3, :]


def gaussian_kernels(sigma: torch.Tensor, size: int, enabled: torch.Tensor) -> torch.Tensor:
    """(B,) sigmas -> (B, size) normalized 1-D Gaussians; a delta kernel where `enabled` is False."""
    x = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - size // 2
    # Clamping the exponent keeps every tap either 0 or a normal float: for some small sigmas
    # (0.14-0.15, 0.21-0.23, ...) outer taps fall in float32's subnormal range, and subnormals
    # slow every CPU op downstream of the blur several times over.
    # exp(-60) ~ 1e-26 of the centre tap is far below float32 resolution.
    exponent = -(x**2) / (2 * sigma.unsqueeze(1) ** 2)
    kernels = torch.where(exponent > -60.0, torch.exp(exponent), torch.zeros_like(exponent))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    delta = (x == 0).to(sigma.dtype).expand_as(kernels)
    return torch.where(enabled.unsqueeze(1), kernels, delta)


def blur_matrices(kernels: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) 1-D kernels -> (B, size, size) matrices A with (A @ line) = the line blurred with
    reflect padding (and mirrored first where `flip` is True).

    Blurring as a batched matmul runs near peak FLOP rate on CPU and GPU, unlike a grouped
    convolution with B*C groups, and it folds the horizontal flip in for free: a flip commutes
    with every per-pixel colour op, so mirroring at the blur gives the same view as mirroring first.
    """
    batch, width = kernels.shape
    radius = width // 2
    if radius >= size:
        raise ValueError(f"blur kernel of {width} px needs images larger than {radius} px, got {size}")
    taps = torch.arange(size, device=kernels.device).unsqueeze(1) + torch.arange(-radius, radius + 1,
                                                                                    device=kernels.device)
    taps = taps.abs()
    taps = torch.where(taps > size - 1, 2 * (size - 1) - taps, taps)  # (size, K) reflected columns
    if flip is not None:
        mirrored = size - 1 - taps
        taps = torch.where(flip.view(-1, 1, 1), mirrored, taps)
    taps = taps.expand(batch, size, width)
    matrices = torch.zeros(batch, size, size, device=kernels.device, dtype=kernels.dtype)
    return matrices.scatter_add_(2, taps, kernels.unsqueeze(1).expand(batch, size, width))


class TwoViewAugment(nn.Module):
    """uint8 crops of both views -> normalized (B, 3, H, W) channels_last views in `dtype`."""

    def __init__(self, recipe: ViewRecipe, dtype: torch.dtype = torch.float32, compile: bool = False) -> None:
        super().__init__()
        self.recipe = recipe
        self.dtype = dtype
        # Buffers shaped for the (B, H, 3, W) working layout (see _as_row_planes).
        self.register_buffer("mean", torch.tensor(recipe.mean).view(1, 1, 3, 1), persistent=False)
        self.register_buffer("std", torch.tensor(recipe.std).view(1, 1, 3, 1), persistent=False)
        basis = ColourBasis.build()
        self.register_buffer("gray", basis.gray, persistent=False)
        self.register_buffer("yiq", basis.yiq, persistent=False)
        self.register_buffer("yiq_inv", basis.yiq_inv, persistent=False)
        self.register_buffer("to_gray", basis.gray.expand(3, 3).clone(), persistent=False)
        self.register_buffer("keep_colour", torch.eye(3), persistent=False)
        self._view = torch.compile(self.augment_view, dynamic=False) if compile else self.augment_view

    def augment_view(self, crops: torch.Tensor, spec: ViewSpec, u: torch.Tensor) -> torch.Tensor:
        """One view: uint8 crops + (B, _DRAWS) uniforms on the same device -> normalized view.

        Ops whose probability is 0 in `spec` are skipped (a Python branch on the recipe, never on
        tensor values, so it stays sync-free and compiles to a static graph).
        """
        x = _as_row_planes(crops)  # (B, H, 3, W), 0-255
        batch, height, _, width = x.shape
        basis = ColourBasis(self.gray, self.yiq, self.yiq_inv)
        colour = jitter_matrices(u, x.mean(dim=(1, 3)) / 255.0, spec, basis)
        # The colour map applies to [0, 1] values; folding the 1/255 into it saves a pass.
        x = torch.matmul((colour[:, :, :3] / 255.0).unsqueeze(1), x)
        x = x.add_(colour[:, :, 3].view(-1, 1, 3, 1)).clamp_(0.0, 1.0)
        if spec.grayscale_p > 0:
            to_gray = (u[:, _GRAY] < spec.grayscale_p).view(-1, 1, 1)
            x = torch.matmul(torch.where(to_gray, self.to_gray, self.keep_colour).unsqueeze(1), x)
        kernels = gaussian_kernels(_uniform(u[:, _SIGMA], *spec.blur_sigma), self.recipe.blur_kernel_size,
                                   u[:, _BLUR] < spec.blur_p)
        rows = blur_matrices(kernels, height)
        cols = blur_matrices(kernels, width, flip=u[:, _FLIP] < spec.flip_p)
        x = torch.bmm(rows, x.view(batch, height, 3 * width))
        x = torch.bmm(x.view(batch, height * 3, width), cols.transpose(1, 2)).view(batch, height, 3, width)
        if spec.solarize_p > 0:
            solarize = (u[:, _SOLARIZE] < spec.solarize_p).view(-1, 1, 1, 1)
            x = torch.where(solarize & (x >= spec.solarize_threshold), 1.0 - x, x)
        x = (x - self.mean) / self.std
        return x.permute(0, 2, 1, 3).to(self.dtype, memory_format=torch.channels_last)

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment two crop batches, or one stacked batch (B, 2, H, W, 3) / (B, 2, 3, H, W) as `view1`."""
        if view2 is None:
            if view1.dim() != 5 or view1.shape[1] != 2:
                raise ValueError(f"one input must stack both views as (B, 2, ...), got {tuple(view1.shape)}")
            view1, view2 = view1[:, 0], view1[:, 1]
        outputs = []
        for crops, spec in zip((view1, view2), self.recipe.views, strict=True):
            u = torch.rand(crops.shape[0], _DRAWS, device=crops.device, generator=generator)
            outputs.append(self._view(crops, spec, u))
        return outputs[0], outputs[1]
