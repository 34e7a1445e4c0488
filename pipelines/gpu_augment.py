"""Batched per-sample photometric augmentations of both BYOL views, on whatever device the crops live.

    augment = TwoViewAugment(recipe, dtype=torch.bfloat16).to(device)
    view1, view2 = augment(crops1_u8, crops2_u8)    # or augment(stacked_u8) with shape (B, 2, H, W, 3)

Every random parameter is drawn per sample on the device in one `torch.rand` call per view; no
value ever comes back to the host (no `.item()`, no Python branching on tensor values), so the
module runs asynchronously on CUDA and compiles with torch.compile.

Colour jitter follows `recipe.jitter` (the formulas of both modes are in pipelines/views.py), the
four ops in a random order per sample. Brightness and contrast (either mode), torchvision's
gray-blend saturation and the hue rotation below are affine maps of the RGB vector (contrast pivots
on image means, which an affine map carries along exactly), so each sample's ordered chain composes
into ONE 3x4 matrix applied in a single pass. The official HSV saturation (x -> V - g (V - x), V the
pixel's max channel) is not affine: in "official" mode the chain is split at it per sample, into
one matrix for the ops drawn before it, the HSV op, and one matrix for those after it (one more
pass over the image: about a third more time for this module on 2 CPU cores at 224 px).
The DALI loader builds the same maps (pipelines/dali_loader.py). Where they depart from the formulas
(tests/test_jitter_fidelity.py measures both, on a real photo):
- Clipping to [0, 1] once at the end of each fused segment (official mode also clips before the HSV
  op, which needs [0, 1] input), not after every op: an op pushing pixels out of range and a later
  one that would bring them back give another result. Over the whole chain at the recipe's
  strengths this moves the laws of the contrast and saturation shifts by a KS distance of up to
  0.08; each op alone is exact.
- Hue is a rotation of the YIQ chroma plane by HUE_RADIANS_PER_TURN * h (a positive h turns red
  towards green, as HSV's H + h does), not the RGB->HSV->RGB round trip: linear, so it fuses, but it
  keeps luma where HSV keeps the max and min channels. Over |h| <= 0.1 the mean per-pixel distance
  of a view from the exact HSV hue is 18/255 on average and at most 37/255 on a colourful photo
  (mean chroma 0.36), at most 3.3/255 on a grayish one (0.06). The hue law is symmetric, so a
  rotation in the wrong direction would not show in any distribution: a test pins the direction.

Other choices:
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

# Luma weights of torchvision's tensor rgb_to_grayscale and the official code (ITU-R 601, as rounded there).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# Angle of the (I, Q)-plane rotation per turn of hue shift. HSV hue runs red -> green -> blue
# clockwise in that plane, so the minus sign turns colours the way HSV's H + shift
# (torchvision's adjust_hue) does.
HUE_RADIANS_PER_TURN = -2 * math.pi

# Columns of the per-sample uniform draws (one torch.rand(B, _DRAWS) per view).
_FLIP, _JITTER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(10)
_ORDER = slice(10, 14)  # four keys (brightness, contrast, saturation, hue) whose argsort is the jitter order
_SAT_KEY = _ORDER.start + (_SAT - _BRIGHT)  # the saturation op's order key
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


def _factor(u: torch.Tensor, strength: float) -> torch.Tensor:
    """A jitter factor ~ U[max(0, 1 - strength), 1 + strength]."""
    return _uniform(u, max(0.0, 1 - strength), 1 + strength)


class ColourBasis(NamedTuple):
    """Constant colour matrices, made once on the host and kept on the device: building them per
    batch would copy from pageable host memory (and `linalg.inv` checks its result on the host),
    three host syncs per view on CUDA. The DALI loader builds its colour maps from the same ones.

    `build(device, dtype)` makes them (computed in float64, then cast to `dtype` on `device`).
    """

    gray: torch.Tensor  # (3,) luma weights
    # The hue rotation by theta is hue_fixed + cos(theta) hue_cos + sin(theta) hue_sin (see hue_matrix).
    hue_fixed: torch.Tensor  # (3, 3)
    hue_cos: torch.Tensor  # (3, 3)
    hue_sin: torch.Tensor  # (3, 3)

    @classmethod
    def build(cls, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ColourBasis:
        yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
        # Luma kept, chroma (I, Q) kept, and the sine part of a rotation of the (I, Q) plane, in YIQ.
        luma, chroma, turn = torch.zeros(3, 3, 3, dtype=torch.float64)
        luma[0, 0] = chroma[1, 1] = chroma[2, 2] = 1.0
        turn[1, 2], turn[2, 1] = -1.0, 1.0
        parts = (torch.linalg.inv(yiq) @ m @ yiq for m in (luma, chroma, turn))
        return cls(*(t.to(device, dtype) for t in (torch.tensor(GRAY_WEIGHTS, dtype=torch.float64), *parts)))


def hue_matrix(hue: torch.Tensor, basis: ColourBasis) -> torch.Tensor:
    """(B,) hue shifts in turns -> (B, 3, 3) RGB matrices rotating the YIQ chroma plane by
    HUE_RADIANS_PER_TURN * hue: a positive shift turns red towards green."""
    theta = (HUE_RADIANS_PER_TURN * hue).view(-1, 1, 1)
    return basis.hue_fixed + torch.cos(theta) * basis.hue_cos + torch.sin(theta) * basis.hue_sin


def hsv_saturation(x: torch.Tensor, factor: torch.Tensor | float, dim: int) -> torch.Tensor:
    """The official saturation op on RGB values in [0, 1] along `dim`: HSV's S -> clip(S * factor, 0, 1).

    Hue and V (the max channel) stay, so every channel moves along its own distance to V:
    x -> V - g (V - x) with g = min(factor, V / C), C = V - min; g < factor where S * factor would
    pass 1 (the smallest channel stops at 0). `factor` broadcasts against x with `dim` kept.
    """
    r, g, b = x.split(1, dim=dim)
    # Elementwise over the three planes: several times faster than a reduction over a size-3 dim.
    low, top = torch.minimum(torch.minimum(r, g), b), torch.maximum(torch.maximum(r, g), b)
    # Gray pixels (C = 0) have x = V, so any finite g leaves them unchanged.
    g = torch.clamp(top / (top - low).clamp_min_(1e-12), max=factor)
    return torch.addcmul(top - g * top, g, x)  # one pass over the image for V - g (V - x)


def jitter_matrices(u: torch.Tensor, mean_rgb: torch.Tensor, spec: ViewSpec, basis: ColourBasis,
                    mode: str = "torchvision", steps: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample (B, 3, 4) affine colour maps of the jitter chain, in random order per sample.

    A map M acts on an RGB column x in [0, 1] as M[:, :3] @ x + M[:, 3]; samples whose jitter does not
    fire (u[:, jitter column] >= spec.jitter_p) get the identity.

    Parameters
    ----------
    u: (B, _DRAWS) uniforms in [0, 1), the view's per-sample draws; their dtype and device are the maps'.
    mean_rgb: (B, 3) mean colour of each input image on the [0, 1] scale (the contrast op's pivot).
    spec: the view's jitter strengths and probability.
    basis: the colour constants, on u's device.
    mode: one of views.JITTER_MODES ("torchvision": every op is affine). In "official" mode the
        saturation op is not affine and is left out (identity): the caller applies `hsv_saturation`
        between the maps of the steps before and after it.
    steps: (B, 4) bool, which steps of each sample's order to compose (default: all four).
    """
    batch, device, dtype = u.shape[0], u.device, u.dtype
    official = mode == "official"
    eye = torch.eye(4, device=device, dtype=dtype).expand(batch, 4, 4)
    eye3 = torch.eye(3, device=device, dtype=dtype)

    def affine(m3: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        out = eye.clone()
        out[:, :3, :3] = m3
        if offset is not None:
            out[:, :3, 3] = offset
        return out

    if official:
        shift = _uniform(u[:, _BRIGHT], -spec.brightness, spec.brightness)
        bright_m = affine(eye3.expand(batch, 3, 3), shift.unsqueeze(1).expand(batch, 3))
        sat_m = eye
    else:
        bright_m = affine(_factor(u[:, _BRIGHT], spec.brightness).view(-1, 1, 1) * eye3)
        sat = _factor(u[:, _SAT], spec.saturation).view(-1, 1, 1)
        sat_m = affine(sat * eye3 + (1 - sat) * basis.gray.expand(3, 3))  # every gray row = luma
    # U[-hue, hue] as hue - 2 hue u: the law is symmetric, so the draw's direction is free, and this
    # one keeps the matrix of each u that tests/test_gpu_augment.py pins.
    hue_m = affine(hue_matrix(_uniform(u[:, _HUE], spec.hue, -spec.hue), basis))
    contrast = _factor(u[:, _CONTRAST], spec.contrast)
    order = u[:, _ORDER].argsort(dim=1)  # (B, 4): op index (bright, contrast, sat, hue) at each step
    op_ids = torch.arange(4, device=device)
    total = eye
    mean_h = torch.cat([mean_rgb, torch.ones_like(mean_rgb[:, :1])], dim=1).unsqueeze(-1)  # (B, 4, 1)
    for step in range(4):
        # Contrast pivots on the means of the image as it is at this step of the chain: each
        # channel's own (official) or the gray one (torchvision).
        current = (total @ mean_h)[:, :3, 0]  # (B, 3)
        pivot = current if official else (current @ basis.gray).unsqueeze(1).expand(batch, 3)
        contrast_m = affine(contrast.view(-1, 1, 1) * eye3, (1 - contrast).unsqueeze(1) * pivot)
        ops = torch.stack([bright_m, contrast_m, sat_m, hue_m], dim=1)  # (B, 4, 4, 4)
        # A comparison, not F.one_hot: one_hot checks its input's range on the host (two syncs).
        pick = (order[:, step].unsqueeze(1) == op_ids).to(dtype).view(batch, 4, 1, 1)
        chosen = (ops * pick).sum(dim=1)
        if steps is not None:
            chosen = torch.where(steps[:, step].view(-1, 1, 1), chosen, eye)
        total = chosen @ total
    applied = (u[:, _JITTER] < spec.jitter_p).view(-1, 1, 1)
    return torch.where(applied, total, eye)[:, :3, :]


def _apply_colour(colour: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(B, 3, 4) maps applied to (B, H, 3, W) values times `scale`, clipped to [0, 1] (a new tensor)."""
    # Folding `scale` into the 3x3 part saves a pass over the image.
    out = torch.matmul((colour[:, :, :3] * scale).unsqueeze(1), x)
    return out.add_(colour[:, :, 3].view(-1, 1, 3, 1)).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: torch.Tensor, size: int, enabled: torch.Tensor) -> torch.Tensor:
    """(B,) sigmas -> (B, size) normalized 1-D Gaussians; a delta kernel where `enabled` is False.

    Parameters
    ----------
    sigma: (B,) standard deviations in pixels; the kernels take its dtype and device.
    size: taps per kernel, odd (`ViewRecipe.blur_kernel_size`), centred on tap size // 2.
    enabled: (B,) bool, which samples are blurred.
    """
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

    Parameters
    ----------
    kernels: (B, K) 1-D kernels, K odd (`gaussian_kernels`); K // 2 must be below `size` (ValueError).
    size: length of the lines blurred: the image's height for the row pass, its width for the column pass.
    flip: (B,) bool, which samples are mirrored (default: none).
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
    """uint8 crops of both views -> normalized (B, 3, H, W) channels_last views in `dtype`.

    Move it to the crops' device with `.to(device)` (its constants are buffers); the ffcv loader runs it
    on its batches, and tests and benchmarks call it on CPU crops.

    Parameters
    ----------
    recipe: both views' photometric specs, the jitter mode, the blur kernel size and the normalization;
        the crops arrive already cropped and resized to the output size.
    dtype: the views' dtype (the step's: `models.step.view_dtype`); the work is done in float32.
    compile: torch.compile `augment_view` (static shapes: one graph per crop size and spec).
    """

    def __init__(self, recipe: ViewRecipe, dtype: torch.dtype = torch.float32, compile: bool = False) -> None:
        super().__init__()
        self.recipe = recipe
        self.dtype = dtype
        # Buffers shaped for the (B, H, 3, W) working layout (see _as_row_planes).
        self.register_buffer("mean", torch.tensor(recipe.mean).view(1, 1, 3, 1), persistent=False)
        self.register_buffer("std", torch.tensor(recipe.std).view(1, 1, 3, 1), persistent=False)
        basis = ColourBasis.build()
        for name, value in basis._asdict().items():
            self.register_buffer(name, value, persistent=False)
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
        x = self._jitter(x, spec, u)  # [0, 1]
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

    def _jitter(self, x: torch.Tensor, spec: ViewSpec, u: torch.Tensor) -> torch.Tensor:
        """Colour jitter of (B, H, 3, W) values on the 0-255 scale -> [0, 1] values."""
        if spec.jitter_p == 0:
            return x.div(255.0)
        basis = ColourBasis(*(getattr(self, name) for name in ColourBasis._fields))
        mode = self.recipe.jitter
        if mode != "official" or spec.saturation == 0:
            return _apply_colour(jitter_matrices(u, x.mean(dim=(1, 3)) / 255.0, spec, basis, mode), x, 1 / 255)
        # The HSV saturation splits each sample's chain at its own (random) step.
        keys = u[:, _ORDER]
        position = (keys < u[:, _SAT_KEY : _SAT_KEY + 1]).sum(dim=1, keepdim=True)  # (B, 1)
        steps = torch.arange(4, device=u.device)
        before = jitter_matrices(u, x.mean(dim=(1, 3)) / 255.0, spec, basis, mode, steps < position)
        x = _apply_colour(before, x, 1 / 255)
        fired = u[:, _JITTER] < spec.jitter_p
        factor = torch.where(fired, _factor(u[:, _SAT], spec.saturation), torch.ones_like(u[:, _SAT]))
        x = hsv_saturation(x, factor.view(-1, 1, 1, 1), dim=2)
        return _apply_colour(jitter_matrices(u, x.mean(dim=(1, 3)), spec, basis, mode, steps > position), x)

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment two crop batches, or one stacked batch (B, 2, H, W, 3) / (B, 2, 3, H, W) as `view1`.

        Parameters
        ----------
        view1: uint8 crops of view 1, (B, H, W, 3) or (B, 3, H, W), on this module's device; or both views
            stacked on dim 1 when view2 is None.
        view2: uint8 crops of view 2, shaped like view1.
        generator: draws the per-sample random parameters, on the crops' device (default: torch's global
            generator); the ffcv loader passes one seeded per (seed, rank, epoch, batch).
        """
        if view2 is None:
            if view1.dim() != 5 or view1.shape[1] != 2:
                raise ValueError(f"one input must stack both views as (B, 2, ...), got {tuple(view1.shape)}")
            view1, view2 = view1[:, 0], view1[:, 1]
        outputs = []
        for crops, spec in zip((view1, view2), self.recipe.views, strict=True):
            u = torch.rand(crops.shape[0], _DRAWS, device=crops.device, generator=generator)
            outputs.append(self._view(crops, spec, u))
        return outputs[0], outputs[1]
