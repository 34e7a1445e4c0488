"""The torchvision baseline loader (pipelines/torchvision_loader.py): the loader contract and the same
view statistics as the fast loaders (loader_contract.py), its separable Gaussian blur (torchvision's own
result, and the recipe's sigma law), and files that vanish or break after the scan or hide another format
behind a .JPEG name."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from image_files import corrupt_body_jpeg, misnamed_folder, png_folder
from loader_contract import LoaderContract
from torchvision.transforms import v2

from pipelines.base import LoaderConfig
from pipelines.torchvision_loader import SeparableGaussianBlur, build_loader, view_transform
from pipelines.views import BYOL_VIEWS

RES = 16


class TestTorchvisionLoader(LoaderContract):
    module = "pipelines.torchvision_loader"


# ---------------------------------------------------------------- the Gaussian blur


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


# ---------------------------------------------------------------- files that change or lie after the scan


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 1])
def test_torchvision_skips_files_that_vanish_or_break_after_the_scan(tmp_path, caplog, workers):
    paths = png_folder(tmp_path)
    broken = tmp_path / "class_1" / "broken.JPEG"
    corrupt_body_jpeg(broken)
    loader = build_loader(LoaderConfig(str(tmp_path), batch_size=4, workers=workers, drop_last=False,
                                       recipe=BYOL_VIEWS.with_overrides(res=RES)))
    assert len(loader.index.samples) == 7  # the scan cannot see either problem
    paths[2].unlink()
    with caplog.at_level(logging.WARNING, logger="datasources.imagefolder"):
        seen = sum(labels.numel() for _, _, labels in loader)
    assert seen == 5
    assert sorted(path for path, _ in loader.skipped) == sorted([str(paths[2]), str(broken)])
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert str(paths[2]) in messages and "no longer exists" in messages
    assert str(broken) in messages and "cannot decode" in messages


@pytest.mark.timeout(60)
def test_torchvision_reads_a_gif_named_jpeg(tmp_path):
    misnamed_folder(tmp_path)
    loader = build_loader(LoaderConfig(str(tmp_path), batch_size=4, workers=0, drop_last=False,
                                       recipe=BYOL_VIEWS.with_overrides(res=RES)))
    assert not loader.bad_files and sum(labels.numel() for _, _, labels in loader) == 7 and not loader.skipped
