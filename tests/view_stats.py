"""Independent reference for the view recipe's per-sample probabilities, shared by every loader's tests.

Each augmentation is isolated: `isolate(recipe, op)` keeps only `op` (at the recipe's probability per
view) and makes the crop the whole image, so a controlled input (`controlled_image`) shows from the
output alone whether `op` fired (`detect`). Rates are then checked against the recipe with a binomial
tolerance (`assert_rate`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from pipelines.views import ViewRecipe, ViewSpec

OPS = ("flip", "grayscale", "solarize", "blur", "jitter")
_P_FIELD = {"flip": "flip_p", "grayscale": "grayscale_p", "solarize": "solarize_p", "blur": "blur_p",
            "jitter": "jitter_p"}


def isolate(recipe: ViewRecipe, op: str) -> ViewRecipe:
    """Recipe with only `op` active (same p per view), whole-image crops, and blur strong enough to see."""
    off = {field: 0.0 for field in _P_FIELD.values()}

    def only(spec: ViewSpec) -> ViewSpec:
        kept = {**off, _P_FIELD[op]: getattr(spec, _P_FIELD[op])}
        # sigma >= 1.5 makes every blur visible on a 2-px checkerboard (sigma 0.1 is a no-op).
        return replace(spec, **kept, blur_sigma=(1.5, 2.0))

    return replace(recipe, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                   view1=only(recipe.view1), view2=only(recipe.view2))


def expected_rate(recipe: ViewRecipe, op: str, view: int) -> float:
    return getattr(recipe.views[view], _P_FIELD[op])


def controlled_image(op: str, res: int) -> np.ndarray:
    """uint8 (res, res, 3) RGB image on which `op` leaves an unmistakable mark."""
    if op == "flip":  # left dark, right bright
        ramp = np.linspace(20, 235, res, dtype=np.float64)
        return np.broadcast_to(ramp[None, :, None], (res, res, 3)).astype(np.uint8).copy()
    if op in ("grayscale", "jitter"):  # saturated colour
        return np.broadcast_to(np.array([200, 100, 50], np.uint8), (res, res, 3)).copy()
    if op == "solarize":  # bright gray 0.8 -> 0.2 when solarized
        return np.full((res, res, 3), 204, np.uint8)
    if op == "blur":  # 4-px checkerboard: a Gaussian blur with sigma >= 1.5 flattens it
        yy, xx = np.mgrid[0:res, 0:res]
        board = np.where(((yy // 4) + (xx // 4)) % 2 == 0, 40, 215).astype(np.uint8)
        return np.repeat(board[:, :, None], 3, axis=2)
    raise ValueError(f"unknown op {op!r}")


def to_unit(view: torch.Tensor, recipe: ViewRecipe) -> torch.Tensor:
    """Undo normalization: (B, 3, H, W) -> float64 in [0, 1] scale."""
    mean = torch.tensor(recipe.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, dtype=torch.float64).view(1, 3, 1, 1)
    return view.detach().to("cpu", torch.float64) * std + mean


def detect(op: str, unit: torch.Tensor) -> torch.Tensor:
    """Bool (B,) telling, for views of `controlled_image(op)` in [0, 1], whether `op` fired."""
    if op == "flip":
        half = unit.shape[-1] // 2
        return unit[..., :half].mean(dim=(1, 2, 3)) > unit[..., half:].mean(dim=(1, 2, 3))
    if op == "grayscale":
        return (unit.amax(dim=1) - unit.amin(dim=1)).mean(dim=(1, 2)) < 0.02
    if op == "solarize":
        return unit.mean(dim=(1, 2, 3)) < 0.5
    if op == "blur":
        original = (215 - 40) / 2 / 255  # std of the checkerboard
        inner = unit[..., 4:-4, 4:-4]
        return inner.std(dim=(1, 2, 3)) < 0.6 * original
    if op == "jitter":
        colour = torch.tensor([200, 100, 50], dtype=torch.float64).view(1, 3, 1, 1) / 255
        return (unit - colour).abs().amax(dim=(1, 2, 3)) > 3 / 255
    raise ValueError(f"unknown op {op!r}")


def assert_rate(hits: torch.Tensor, p: float, sigmas: float = 4.5, label: str = "") -> None:
    """Binomial check: the observed rate is within `sigmas` standard errors of p (exact at p = 0 or 1).

    4.5 sigma gives a false-failure chance below 1e-5 per check.
    """
    n = hits.numel()
    rate = hits.double().mean().item()
    if p in (0.0, 1.0):
        assert rate == p, f"{label}: rate {rate:.3f} over {n} samples, expected exactly {p}"
        return
    tolerance = sigmas * math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= tolerance, f"{label}: rate {rate:.3f} over {n} samples, expected {p} +- {tolerance:.3f}"


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def isolate_jitter(recipe: ViewRecipe, ops: tuple[str, ...], mode: str) -> ViewRecipe:
    """Recipe whose views apply only the colour jitter (p = 1, `mode`) with only `ops` at the recipe's
    strengths, on whole-image crops, so each view is the jitter of the input image alone."""
    probabilities = {**{field: 0.0 for field in _P_FIELD.values()}, "jitter_p": 1.0}

    def only(spec: ViewSpec) -> ViewSpec:
        strengths = {op: getattr(spec, op) if op in ops else 0.0 for op in JITTER_OPS}
        return replace(spec, **probabilities, **strengths)

    return replace(recipe, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter=mode,
                   view1=only(recipe.view1), view2=only(recipe.view2))
