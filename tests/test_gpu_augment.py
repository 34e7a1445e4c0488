"""TwoViewAugment against the recipe's per-view rates and hand-computed single-op references."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from view_stats import OPS, assert_rate, controlled_image, detect, expected_rate, isolate, to_unit

from pipelines.gpu_augment import GRAY_WEIGHTS, ColourBasis, TwoViewAugment, gaussian_kernels, jitter_matrices
from pipelines.views import BYOL_VIEWS, ViewRecipe, ViewSpec

RES = 32
SMALL = replace(BYOL_VIEWS, res=RES)
OFF = ViewSpec(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _batch(image: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).expand(n, *image.shape).contiguous()


def _only(view1: ViewSpec, view2: ViewSpec = OFF) -> ViewRecipe:
    """Whole-image recipe with the given per-view specs (crop geometry plays no part here)."""
    return replace(SMALL, view1=view1, view2=view2)


@pytest.fixture(scope="module")
def photo(photo_corpus: str) -> np.ndarray:
    """A real photo resized to RES x RES, uint8 (RES, RES, 3)."""
    path = sorted(Path(photo_corpus).rglob("*.JPEG"))[0]
    with Image.open(path) as img:
        return np.array(img.convert("RGB").resize((RES, RES), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("op", OPS)
def test_per_view_rates_match_recipe(op: str) -> None:
    """2000 samples of one batch: each op fires per sample at its recipe probability in each view."""
    recipe = isolate(SMALL, op)
    crops = _batch(controlled_image(op, RES), 2000)
    views = TwoViewAugment(recipe)(crops, crops, generator=torch.Generator().manual_seed(1))
    for index, view in enumerate(views):
        assert_rate(
            detect(op, to_unit(view, recipe)), expected_rate(recipe, op, index), label=f"{op} view{index + 1}"
        )


def test_jitter_parameters_differ_per_sample(photo: np.ndarray) -> None:
    recipe = _only(replace(OFF, jitter_p=1.0))
    view, _ = TwoViewAugment(recipe)(
        _batch(photo, 64), _batch(photo, 64), generator=torch.Generator().manual_seed(2)
    )
    means = view.mean(dim=(2, 3))
    # A per-batch draw would give 64 identical outputs; per-sample draws give 64 distinct colours.
    assert torch.unique(means.round(decimals=4), dim=0).shape[0] == 64


def test_output_layout_dtype_and_input_layouts(photo: np.ndarray) -> None:
    augment = TwoViewAugment(SMALL, dtype=torch.bfloat16)
    nhwc = _batch(photo, 8)
    out1, out2 = augment(
        nhwc.unsqueeze(1).expand(8, 2, RES, RES, 3), generator=torch.Generator().manual_seed(3)
    )
    for out in (out1, out2):
        assert out.shape == (8, 3, RES, RES) and out.dtype == torch.bfloat16
        assert out.is_contiguous(memory_format=torch.channels_last)
    again1, _ = augment(
        nhwc.permute(0, 3, 1, 2), nhwc.permute(0, 3, 1, 2), generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(again1, out1)
    with pytest.raises(ValueError, match="stack both views"):
        augment(nhwc)


def test_solarize_and_normalize_exact_values() -> None:
    recipe = _only(OFF, replace(OFF, solarize_p=1.0))
    image = np.zeros((RES, RES, 3), np.uint8)
    image[:, : RES // 2] = (100, 127, 128)  # below, below and at the 0.5 threshold (128/255 > 0.5)
    image[:, RES // 2 :] = (200, 255, 0)
    crops = _batch(image, 4)
    view1, view2 = TwoViewAugment(recipe)(crops, crops)
    mean, std = np.array(recipe.mean), np.array(recipe.std)
    unit = image.astype(np.float64) / 255
    solarized = np.where(unit >= 0.5, 1 - unit, unit)
    for view, expected in ((view1, unit), (view2, solarized)):
        want = torch.from_numpy(((expected - mean) / std).transpose(2, 0, 1)).expand(4, 3, RES, RES)
        torch.testing.assert_close(view.double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_blur_and_flip_match_reference_convolution(photo: np.ndarray, flip: bool) -> None:
    sigma = 1.3
    recipe = _only(replace(OFF, blur_p=1.0, blur_sigma=(sigma, sigma), flip_p=float(flip)))
    view, _ = TwoViewAugment(recipe)(_batch(photo, 2), _batch(photo, 2))
    size = recipe.blur_kernel_size
    taps = torch.tensor([math.exp(-(t**2) / (2 * sigma**2)) for t in range(-(size // 2), size // 2 + 1)])
    kernel2d = torch.outer(taps, taps) / taps.sum() ** 2
    x = torch.from_numpy(photo).permute(2, 0, 1).double().unsqueeze(0) / 255
    if flip:
        x = x.flip(-1)
    padded = F.pad(x, (size // 2,) * 4, mode="reflect")
    reference = F.conv2d(padded, kernel2d.double().expand(3, 1, size, size), groups=3)
    torch.testing.assert_close(to_unit(view, recipe), reference.expand(2, 3, RES, RES), atol=2e-6, rtol=0)


def _reference_jitter(
    x: torch.Tensor, order: list[int], b: float, c: float, s: float, h: float
) -> torch.Tensor:
    """Straightforward sequential jitter on one (3, H, W) image (no clamping), for the fused matrix."""
    gray_w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype).view(3, 1, 1)
    yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype
    )
    for op in order:
        gray = (x * gray_w).sum(0, keepdim=True)
        if op == 0:
            x = x * b
        elif op == 1:
            x = c * x + (1 - c) * gray.mean()
        elif op == 2:
            x = s * x + (1 - s) * gray
        else:
            q = torch.einsum("ij,jhw->ihw", yiq, x)
            angle = 2 * math.pi * h
            i, qq = (
                q[1] * math.cos(angle) - q[2] * math.sin(angle),
                q[1] * math.sin(angle) + q[2] * math.cos(angle),
            )
            x = torch.einsum("ij,jhw->ihw", torch.linalg.inv(yiq), torch.stack([q[0], i, qq]))
    return x


def test_fused_jitter_matrix_equals_sequential_ops_in_drawn_order(photo: np.ndarray) -> None:
    spec = BYOL_VIEWS.view1
    x = torch.from_numpy(photo).permute(2, 0, 1).double() / 255
    generator = torch.Generator().manual_seed(4)
    u = torch.rand(16, 14, generator=generator, dtype=torch.float64)
    u[:, 1] = 0.0  # jitter always applied
    matrices = jitter_matrices(u, x.mean(dim=(1, 2)).expand(16, 3), spec, ColourBasis.build(dtype=torch.float64))
    for k in range(16):
        b, c, s = (1 + (2 * u[k, col].item() - 1) * m for col, m in ((2, 0.4), (3, 0.4), (4, 0.2)))
        h = (2 * u[k, 5].item() - 1) * 0.1
        order = u[k, 10:14].argsort().tolist()
        want = _reference_jitter(x, order, b, c, s, h)
        got = torch.einsum("ij,jhw->ihw", matrices[k, :, :3], x) + matrices[k, :, 3].view(3, 1, 1)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_jitter_order_varies_per_sample() -> None:
    u = torch.rand(4000, 14, generator=torch.Generator().manual_seed(5))
    first = u[:, 10:14].argsort(dim=1)[:, 0]
    # Each of the four ops comes first in a quarter of the samples (4.5-sigma binomial bound).
    for op in range(4):
        assert_rate(first == op, 0.25, label=f"op {op} first")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_module_matches_eager(photo) -> None:
    crops = _batch(np.stack([photo, photo[::-1]], axis=0), 8)  # (8, 2, RES, RES, 3)
    outputs = []
    for compile in (False, True):
        augment = TwoViewAugment(SMALL, torch.float32, compile=compile)
        outputs.append(augment(crops, generator=torch.Generator().manual_seed(5)))
    for eager, compiled in zip(*outputs, strict=True):
        assert compiled.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_blur_kernels_have_no_subnormal_taps() -> None:
    """Subnormal taps (sigma near 0.1) made every CPU op after the blur several times slower."""
    sigma = torch.linspace(0.1, 2.0, 2000)
    kernels = gaussian_kernels(sigma, 23, torch.ones(2000, dtype=torch.bool))
    nonzero = kernels[kernels != 0]
    assert nonzero.min() >= torch.finfo(torch.float32).tiny
    torch.testing.assert_close(kernels.sum(dim=1), torch.ones(2000))
    # The narrowest kernel keeps its two nearest taps (exp(-50) of the centre), only the far ones are 0.
    assert (kernels[0] != 0).sum() == 3
