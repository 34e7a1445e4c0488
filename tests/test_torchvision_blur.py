"""The torchvision baseline's Gaussian blur: torchvision's own result, and the recipe's sigma law."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from pipelines.torchvision_loader import SeparableGaussianBlur, view_transform
from pipelines.views import BYOL_VIEWS


@pytest.mark.parametrize("sigma", [0.1, 0.37, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 41, 57)])
def test_equals_torchvisions_dense_blur(sigma: float, shape: tuple[int, int, int]) -> None:
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    blur = SeparableGaussianBlur(23, (sigma, sigma))
    expected = v2.functional.gaussian_blur(image, [23, 23], [sigma, sigma])
    torch.testing.assert_close(blur(image), expected, rtol=0, atol=2e-6)


def _blur_step(spec_index: int) -> v2.RandomApply:
    """The RandomApply(blur) the loader's transform for view `spec_index` really runs."""
    recipe = BYOL_VIEWS
    steps = [t for t in view_transform(recipe, recipe.views[spec_index]).transforms
             if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], SeparableGaussianBlur)]
    assert len(steps) == 1
    return steps[0]


def _sigma_of_blurred_impulse(out: torch.Tensor) -> float | None:
    """sigma of a Gaussian that turned a centred impulse into `out`, or None if it was not blurred.

    The centre pixel is k0^2 and its right neighbour k0 k1, with k1 / k0 = exp(-1 / (2 sigma^2)), a
    ratio float32 resolves for every sigma of the recipe (exp(-50) at sigma 0.1)."""
    c = out.shape[-1] // 2
    centre, right = float(out[0, c, c]), float(out[0, c, c + 1])
    if right == 0.0 and centre == 1.0:
        return None
    return math.sqrt(-1.0 / (2.0 * math.log(right / centre)))


@pytest.mark.parametrize("view", [0, 1])
def test_blur_probability_and_sigma_follow_the_recipe(view: int) -> None:
    """Statistical: N draws of the loader's blur step on an impulse. The blurred share must be
    blur_p within 4 binomial standard deviations, and the recovered sigmas must be U[0.1, 2.0] by a
    Kolmogorov-Smirnov test at alpha = 0.001 (critical D = 1.949 / sqrt(n))."""
    torch.manual_seed(view)
    spec = BYOL_VIEWS.views[view]
    step = _blur_step(view)
    assert step.transforms[0].kernel_size == BYOL_VIEWS.blur_kernel_size == 23
    impulse = torch.zeros(3, 31, 31)
    impulse[:, 15, 15] = 1.0
    draws = 3000
    sigmas = [s for _ in range(draws) if (s := _sigma_of_blurred_impulse(step(impulse))) is not None]

    p = spec.blur_p
    if p < 1.0:
        assert abs(len(sigmas) - p * draws) <= 4 * math.sqrt(draws * p * (1 - p))
    else:
        assert len(sigmas) == draws
    low, high = spec.blur_sigma
    assert all(low - 1e-4 <= s <= high + 1e-4 for s in sigmas)
    ordered = sorted(sigmas)
    n = len(ordered)
    ks = max(max((i + 1) / n - (s - low) / (high - low), (s - low) / (high - low) - i / n)
             for i, s in enumerate(ordered))
    assert ks < 1.949 / math.sqrt(n), f"KS distance {ks:.4f} over {n} sigmas"


def test_a_too_narrow_sigma_range_fails_the_law() -> None:
    """The KS check above can fail: sigmas drawn from U[0.1, 1.0] are far from U[0.1, 2.0]."""
    torch.manual_seed(0)
    blur = SeparableGaussianBlur(23, (0.1, 1.0))
    impulse = torch.zeros(3, 31, 31)
    impulse[:, 15, 15] = 1.0
    sigmas = sorted(_sigma_of_blurred_impulse(blur(impulse)) for _ in range(500))
    n = len(sigmas)
    ks = max((i + 1) / n - (s - 0.1) / 1.9 for i, s in enumerate(sigmas))
    assert ks > 1.949 / math.sqrt(n)
