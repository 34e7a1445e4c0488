"""Colour-jitter fidelity: every loader applies the formulas of pipelines/views.py, in both modes.

One statistical test, parametrized over loader x jitter mode x case, on one fixed real photo (the
corpus's first colourful photo, square, RES px, lossless PNG, so every loader starts from the same
pixels). A case is one jitter op alone (p = 1, the recipe's strength, everything else off,
whole-image crops) or the whole chain. Each of SAMPLES views is reduced to its per-op shift:
mean-brightness shift, contrast as the std ratio, saturation as the chroma (max - min) ratio, hue
as the chroma-weighted mean HSV hue shift. An independent float64 reference of the formulas (below,
no pipeline code) says what each shift should be. The fused loaders (FUSED: their jitter is one
colour map per sample) turn hue as a YIQ rotation, which they document; for them the reference uses
that rotation, and how far it is from HSV's hue is bounded separately (HUE_YIQ).

- One op alone: the shift is a monotone function of the op's parameter, so it is turned back into
  the parameter, which must follow the recipe's law (U[lo, hi]): one-sample KS distance at most
  KS_ONE. The view must also BE the reference op at that parameter: mean |view - reference| at most
  EXACT. This tells the two modes apart (a contrast pivot, a saturation formula or a clip in the
  wrong place shows there).
- The chain: each of the four shifts must follow the law of the reference chain (random order, a
  clip after every op), two-sample KS distance at most KS_CHAIN; the fused loaders clip once per
  fused segment instead, which moves these laws by up to CLIP_ALLOWANCE more.
- Across loaders: the shifts of every two loaders that implement the same formulas for the case
  (all three, except for hue where only the fused two do), two-sample KS distance at most KS_TWO.

KS bounds are the distances a correct sampler exceeds with probability ALPHA = 1e-3 (asymptotic
Kolmogorov quantile, c = sqrt(-ln(ALPHA / 2) / 2) = 1.95), and every sampler is seeded, so the test
is deterministic. With SAMPLES = 512 a formula difference that moves a law by more than about 0.09
(against the exact law) or 0.12 (between two loaders) fails it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from view_stats import JITTER_OPS, isolate_jitter, to_unit

from foundation.threads import keep_torch_threads
from pipelines.base import LoaderConfig
from pipelines.gpu_augment import ColourBasis, TwoViewAugment, hue_matrix
from pipelines.registry import LOADER_MODULES
from pipelines.views import BYOL_VIEWS, JITTER_MODES, ViewRecipe, ViewSpec

pytestmark = pytest.mark.timeout(300)

RES = 32
# Colourful enough that saturation and hue shifts are measured on colour, not on 8-bit rounding noise.
MIN_CHROMA = 0.15
IMAGES = 256  # per loader and case; two views each
SAMPLES = 2 * IMAGES
REFERENCE_SAMPLES = 4096  # the chain's float64 reference sampler
ALPHA = 1e-3
_KS_C = math.sqrt(-math.log(ALPHA / 2) / 2)
KS_ONE = _KS_C / math.sqrt(SAMPLES)  # 0.086
KS_TWO = _KS_C * math.sqrt(2 / SAMPLES)  # 0.122
KS_CHAIN = _KS_C * math.sqrt(1 / SAMPLES + 1 / REFERENCE_SAMPLES)  # 0.091
# Mean |view - reference op| per view, [0, 1] scale: DALI rounds its jitter output to 8 bits
# (measured at most 0.3/255); torchvision and gpu_augment compute in float32 (0.001/255).
EXACT = 1.5 / 255
# Fused loaders, chain: shift laws measured with 4096 gpu_augment views (4 seeds) against the
# reference with its clip after every op: up to 0.076 (saturation and contrast shifts).
CLIP_ALLOWANCE = 0.08
# Fused loaders, hue alone: mean |view - HSV hue at the same shift| per view, measured on this photo
# (mean chroma 0.36): up to 37.3/255, 18.5/255 on average over U[-0.1, 0.1].
HUE_YIQ = 40 / 255
GRID = 801
CASES = (*JITTER_OPS, "chain")
LOADERS = ("dali", "torchvision", "gpu_augment")
FUSED = ("dali", "gpu_augment")
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114])
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


# ------------------------------------------------------- float64 reference of pipelines/views.py


def rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., 3, H, W) RGB in [0, 1] -> H (turns), S, V, as the official code's rgb_to_hsv."""
    r, g, b = x[..., 0, :, :], x[..., 1, :, :], x[..., 2, :, :]
    top, chroma = x.max(axis=-3), x.max(axis=-3) - x.min(axis=-3)
    sat = np.where(top > 0, chroma / np.where(top > 0, top, 1), 0.0)
    norm = 1 / (6 * np.where(chroma > 0, chroma, 1))
    hue = np.where(r == top, norm * (g - b), np.where(g == top, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6))
    hue = hue * (chroma > 0)
    return hue % 1.0, sat, top


def hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, top: np.ndarray) -> np.ndarray:
    hue, sat, top = np.broadcast_arrays(hue, sat, top)
    chroma = sat * top
    sextant = (hue % 1.0) * 6
    mid = chroma * (1 - np.abs(sextant % 2 - 1))
    which = np.floor(sextant).astype(int) % 6
    # (max, mid, 0) chroma shares of r, g, b in each sextant of the hue circle.
    table = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1], [2, 1, 0], [1, 2, 0], [0, 2, 1]])
    shares = np.stack([chroma, mid, np.zeros_like(chroma)], axis=-3)
    rgb = np.take_along_axis(shares, np.moveaxis(table[which], -1, -3), axis=-3)
    return rgb + (top - chroma)[..., None, :, :]


def gray(x: np.ndarray) -> np.ndarray:
    return np.tensordot(GRAY_WEIGHTS, x, axes=([0], [-3]))[..., None, :, :]


def yiq_hue(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The fused loaders' hue: the (I, Q) plane turned clockwise by 2 pi shift (red towards green);
    shift broadcasts against x's (..., H, W)."""
    theta = -2 * math.pi * shift
    cos, sin = np.cos(theta), np.sin(theta)
    luma, i, q = np.moveaxis(np.einsum("ij,...jhw->...ihw", RGB_TO_YIQ, x), -3, 0)
    turned = np.stack(np.broadcast_arrays(luma, cos * i - sin * q, sin * i + cos * q), axis=-3)
    return np.einsum("ij,...jhw->...ihw", np.linalg.inv(RGB_TO_YIQ), turned)


def reference_op(x: np.ndarray, op: str, mode: str, p: np.ndarray, hue: str = "hsv") -> np.ndarray:
    """One jitter op of `mode` on images x (..., 3, H, W) with parameters p (...,), clipped to [0, 1];
    hue="yiq": the fused loaders' hue rotation instead of HSV's."""
    p = np.asarray(p, dtype=np.float64).reshape(*np.shape(p), 1, 1, 1)
    official = mode == "official"
    if op == "brightness":
        out = x + p if official else x * p
    elif op == "contrast":
        pivot = x.mean(axis=(-2, -1), keepdims=True)
        if not official:
            pivot = gray(pivot)
        out = pivot + p * (x - pivot)
    elif op == "saturation" and not official:
        out = gray(x) + p * (x - gray(x))
    elif op == "hue" and hue == "yiq":
        out = yiq_hue(x, p[..., 0, :, :])
    else:
        hue_turns, sat, top = rgb_to_hsv(x)
        if op == "saturation":
            sat = sat * p[..., 0, :, :]
        else:
            hue_turns = hue_turns + p[..., 0, :, :]
        out = hsv_to_rgb(hue_turns, np.clip(sat, 0, 1), top)
    return np.clip(out, 0.0, 1.0)


def parameter_law(spec: ViewSpec, op: str, mode: str) -> tuple[float, float]:
    """The (lo, hi) of the op's uniform parameter in `mode`."""
    strength = getattr(spec, op)
    if op == "hue" or (op == "brightness" and mode == "official"):
        return -strength, strength
    return max(0.0, 1 - strength), 1 + strength


def reference_chain(x: np.ndarray, spec: ViewSpec, mode: str, hue: str) -> np.ndarray:
    """REFERENCE_SAMPLES draws of the whole jitter chain on x (3, H, W): the four ops in a random
    order per sample, each clipped (seeded, so every loader meets the same reference sample)."""
    rng = np.random.default_rng(0)
    out = np.broadcast_to(x, (REFERENCE_SAMPLES, *x.shape)).copy()
    params = {op: rng.uniform(*parameter_law(spec, op, mode), size=REFERENCE_SAMPLES) for op in JITTER_OPS}
    orders = np.argsort(rng.random((REFERENCE_SAMPLES, len(JITTER_OPS))), axis=1)
    for step in range(len(JITTER_OPS)):
        for index, op in enumerate(JITTER_OPS):
            chosen = orders[:, step] == index
            out[chosen] = reference_op(out[chosen], op, mode, params[op][chosen], hue)
    return out


# ------------------------------------------------------------------------------ per-op shifts


def shifts(x: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
    """Per-op shift of each view (N, 3, H, W) of the input image x (3, H, W)."""
    chroma_x = x.max(axis=0) - x.min(axis=0)
    hue_x = rgb_to_hsv(x)[0]
    hue_turn = (rgb_to_hsv(views)[0] - hue_x + 0.5) % 1.0 - 0.5
    return {
        "brightness": views.mean(axis=(1, 2, 3)) - x.mean(),
        "contrast": (views.std(axis=(2, 3)) / x.std(axis=(1, 2))).mean(axis=1),
        "saturation": (views.max(axis=1) - views.min(axis=1)).mean(axis=(1, 2)) / chroma_x.mean(),
        # Weighted by the input's chroma: the hue of a near-gray pixel is mostly rounding noise.
        "hue": (hue_turn * chroma_x).sum(axis=(1, 2)) / chroma_x.sum(),
    }


def recovered_parameters(x: np.ndarray, views: np.ndarray, spec: ViewSpec, op: str, mode: str,
                         hue: str) -> np.ndarray:
    """The op's parameter of each view, from its shift through the reference's (monotone) shift curve."""
    grid = np.linspace(*parameter_law(spec, op, mode), GRID)
    curve = shifts(x, reference_op(x, op, mode, grid, hue))[op]
    assert (np.diff(curve) > 0).all(), f"the {op} shift is not monotone in its parameter on this photo"
    return np.interp(shifts(x, views)[op], curve, grid)


# ------------------------------------------------------------------------------- KS distances


def ks_uniform(samples: np.ndarray, lo: float, hi: float) -> float:
    """Kolmogorov distance between the empirical law of `samples` and U[lo, hi]."""
    cdf = np.clip((np.sort(samples) - lo) / (hi - lo), 0, 1)
    n = len(samples)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def ks_two(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), points, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


# ---------------------------------------------------------------------------------- samplers


def square(path: Path) -> np.ndarray:
    """The photo's centre square at RES px: uint8 (RES, RES, 3)."""
    with Image.open(path) as img:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        crop = img.convert("RGB").crop((left, top, left + side, top + side))
        return np.array(crop.resize((RES, RES), Image.Resampling.BILINEAR))


def mean_chroma(image: np.ndarray) -> float:
    return float((image.max(axis=-1).astype(np.float64) - image.min(axis=-1)).mean() / 255)


@pytest.fixture(scope="module")
def photo(photo_corpus: str) -> np.ndarray:
    """The corpus's first photo with a mean chroma of at least MIN_CHROMA: on a nearly gray photo the
    saturation and hue shifts would be measured on 8-bit rounding noise."""
    squares = (square(path) for path in sorted(Path(photo_corpus).rglob("*.JPEG")))
    return next(image for image in squares if mean_chroma(image) >= MIN_CHROMA)


@pytest.fixture(scope="module")
def photo_folder(photo: np.ndarray, tmp_path_factory) -> str:
    """IMAGES lossless copies of the photo: one epoch of a folder loader is IMAGES samples."""
    root = tmp_path_factory.mktemp("jitter_photo")
    (root / "class_0").mkdir()
    for i in range(IMAGES):
        Image.fromarray(photo).save(root / "class_0" / f"{i:03d}.png")
    return str(root)


def folder_views(module: str, folder: str, recipe: ViewRecipe, workers: int) -> torch.Tensor:
    cfg = LoaderConfig(folder, batch_size=64, recipe=recipe, workers=workers, drop_last=False)
    loader = importlib.import_module(LOADER_MODULES[module]).build_loader(cfg)
    return torch.cat([to_unit(view, recipe) for view1, view2, _ in loader for view in (view1, view2)])


def sample_views(loader: str, photo: np.ndarray, folder: str, recipe: ViewRecipe) -> np.ndarray:
    """SAMPLES views (N, 3, RES, RES) in [0, 1] of the photo through `loader`, seeded."""
    torch.manual_seed(0)  # torchvision's transforms draw from torch's global generator (workers=0)
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
        views = folder_views("dali", folder, recipe, workers=2)
    elif loader == "torchvision":
        with keep_torch_threads():
            # One thread, as in a DataLoader worker: on tiny per-image tensors a second thread only
            # adds wake-ups (10x slower on a busy machine).
            torch.set_num_threads(1)
            views = folder_views("torchvision", folder, recipe, workers=0)
    else:
        crops = torch.from_numpy(photo).expand(IMAGES, *photo.shape).contiguous()
        views = torch.cat(TwoViewAugment(recipe)(crops, crops, generator=torch.Generator().manual_seed(0)))
        views = to_unit(views, recipe)
    assert views.shape == (SAMPLES, 3, RES, RES)
    return views.numpy()


def case_recipe(mode: str, case: str) -> ViewRecipe:
    ops = JITTER_OPS if case == "chain" else (case,)
    return isolate_jitter(replace(BYOL_VIEWS, res=RES), ops, mode)


@pytest.fixture(scope="module")
def drawn(photo: np.ndarray, photo_folder: str):
    """(loader, mode, case) -> views, each drawn once per module (the cross-loader checks reuse them)."""
    cache: dict[tuple[str, str, str], np.ndarray] = {}

    def get(loader: str, mode: str, case: str) -> np.ndarray:
        key = (loader, mode, case)
        if key not in cache:
            cache[key] = sample_views(loader, photo, photo_folder, case_recipe(mode, case))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def chain_shifts(photo: np.ndarray):
    """(mode, hue model) -> per-op shifts of the reference chain, computed once per module."""
    cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    x = unit(photo)

    def get(mode: str, hue: str) -> dict[str, np.ndarray]:
        if (mode, hue) not in cache:
            cache[mode, hue] = shifts(x, reference_chain(x, case_recipe(mode, "chain").view1, mode, hue))
        return cache[mode, hue]

    return get


# ------------------------------------------------------------------------------------- tests


def unit(image: np.ndarray) -> np.ndarray:
    return image.transpose(2, 0, 1).astype(np.float64) / 255


def hue_model(loader: str) -> str:
    return "yiq" if loader in FUSED else "hsv"


def _check_one_op(x: np.ndarray, views: np.ndarray, spec: ViewSpec, op: str, mode: str, loader: str) -> None:
    lo, hi = parameter_law(spec, op, mode)
    params = recovered_parameters(x, views, spec, op, mode, hue_model(loader))
    distance = ks_uniform(params, lo, hi)
    assert distance <= KS_ONE, f"{loader} {op}: recovered parameters KS {distance:.3f} from U[{lo}, {hi}]"
    error = np.abs(views - reference_op(x, op, mode, params, hue_model(loader))).mean(axis=(1, 2, 3))
    assert error.max() <= EXACT, f"{loader} {op}: mean |view - reference| up to {error.max() * 255:.2f}/255"
    if op == "hue" and loader in FUSED:
        error = np.abs(views - reference_op(x, op, mode, params)).mean(axis=(1, 2, 3))
        assert error.max() <= HUE_YIQ, f"{loader}: YIQ hue {error.max() * 255:.1f}/255 from HSV's"


def _check_chain(measured: dict[str, np.ndarray], expected: dict[str, np.ndarray], loader: str) -> None:
    bound = KS_CHAIN + (CLIP_ALLOWANCE if loader in FUSED else 0.0)
    for op in JITTER_OPS:
        distance = ks_two(measured[op], expected[op])
        assert distance <= bound, f"{loader} chain, {op} shift: KS {distance:.3f} from the reference"


def _same_formulas(loader: str, other: str, case: str) -> bool:
    return case not in ("hue", "chain") or hue_model(loader) == hue_model(other)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", JITTER_MODES)
@pytest.mark.parametrize("loader", LOADERS)
def test_jitter_shifts_match_formulas(drawn, chain_shifts, photo: np.ndarray, loader: str, mode: str,
                                      case: str) -> None:
    x, views = unit(photo), drawn(loader, mode, case)
    measured = shifts(x, views)
    if case == "chain":
        _check_chain(measured, chain_shifts(mode, hue_model(loader)), loader)
    else:
        _check_one_op(x, views, case_recipe(mode, case).view1, case, mode, loader)
    for other in LOADERS:
        if other != loader and _same_formulas(loader, other, case):
            theirs = shifts(x, drawn(other, mode, case))
            for op in JITTER_OPS if case == "chain" else (case,):
                distance = ks_two(measured[op], theirs[op])
                assert distance <= KS_TWO, f"{case} ({mode}), {op} shift: {loader} vs {other} KS {distance:.3f}"


# The recipe's hue law is symmetric, so the shift test above cannot see a hue turning the wrong way.
ORANGE = (200, 100, 50)  # HSV hue 1/18 turn


def _turned_orange(loader: str, spec: ViewSpec, folder: Path, monkeypatch) -> np.ndarray:
    """Views (N, 3, RES, RES) of a flat orange image under `loader`'s hue with its shift pinned to +spec.hue."""
    recipe = case_recipe("official", "hue")
    if loader == "gpu_augment":
        shift = torch.full((1,), spec.hue, dtype=torch.float64)
        colour = hue_matrix(shift, ColourBasis.build(dtype=torch.float64))[0] @ (torch.tensor(ORANGE).double() / 255)
        return colour.clamp(0, 1).view(1, 3, 1, 1).expand(1, 3, RES, RES).numpy()
    module = importlib.import_module(LOADER_MODULES[loader])
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
        from nvidia.dali import fn

        monkeypatch.setattr(module, "_draw", lambda lo, hi: fn.constant(fdata=[hi], shape=[]))
    else:
        monkeypatch.setattr(module, "_draw", lambda lo, hi: hi)
    (folder / "class_0").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((RES, RES, 3), ORANGE, np.uint8)).save(folder / "class_0" / f"{i}.png")
    return folder_views(loader, str(folder), recipe, workers=0 if loader == "torchvision" else 1).numpy()


@pytest.mark.parametrize("loader", LOADERS)
def test_positive_hue_shift_turns_red_towards_green(loader: str, tmp_path: Path, monkeypatch) -> None:
    spec = case_recipe("official", "hue").view1
    orange = np.array(ORANGE, np.float64).reshape(1, 3, 1, 1) / 255
    before = rgb_to_hsv(orange)[0].item()
    turned = rgb_to_hsv(_turned_orange(loader, spec, tmp_path, monkeypatch))[0]
    # HSV moves it by exactly the shift (torchvision's adjust_hue(+0.1) too); YIQ by roughly as much.
    low, high = (0.5, 2.0) if loader in FUSED else (0.99, 1.01)
    assert (turned - before > low * spec.hue).all() and (turned - before < high * spec.hue).all(), (
        f"{loader}: hue {before:.3f} -> {turned.min():.3f}..{turned.max():.3f} under a shift of +{spec.hue}")


def test_recipe_jitter_mode_is_checked_and_overridable() -> None:
    assert BYOL_VIEWS.jitter == "official"
    assert BYOL_VIEWS.with_overrides(jitter="torchvision") == replace(BYOL_VIEWS, jitter="torchvision")
    assert BYOL_VIEWS.with_overrides(res=16, blur=False).jitter == "official"
    with pytest.raises(ValueError, match="jitter must be one of official, torchvision"):
        BYOL_VIEWS.with_overrides(jitter="simclr")
