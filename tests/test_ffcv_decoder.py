"""The FFCV crop decoder (pipelines/ffcv_decoder.py): random-resized-crop draws that follow the view
recipe (and its fallback for extreme aspect ratios), a decode scratch buffer sized for the largest
single image, and decoded crops that match the same crops of the source photos. The loader around it is
tested in test_ffcv_loader.py.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from ffcv_betons import MAX_RES, beton_config, epoch_crops
from PIL import Image

from datasources.imagefolder import scan_image_folder
from pipelines.ffcv_decoder import TwoCropDecoder, random_crop
from pipelines.ffcv_loader import build_loader
from pipelines.views import BYOL_VIEWS

pytestmark = pytest.mark.timeout(180)

# Mean absolute error (0-255 levels) between a decoded crop and the same crop of the full-resolution
# source: a JPEG q90 re-encode with 4:2:0 chroma at 160 px plus the writer's DCT-scaled draft decode
# measure 1.3-11.3 levels per image (3.8 on average) on these photos, and always less than a third of
# the error against the reference shifted by 3 px (which measures 5-46): the relative test is the
# one that tells a right crop from a wrong one whatever the image's detail.
JPEG_MAE_MAX = 16.0
JPEG_MAE_MEAN = 6.0
SHIFT_PX = 3
SHIFT_ERROR_RATIO_MAX = 0.5


def test_decoder_scratch_fits_the_largest_single_image() -> None:
    """One tall and one wide image: the decode buffer must hold the larger of the two (1000 x 12 px),
    not max height x max width (1000 x 1000), since FFCV pins it per batch slot on CUDA machines."""
    from ffcv.pipeline.state import State

    decoder = TwoCropDecoder(BYOL_VIEWS.with_overrides(res=32))
    decoder.metadata = np.array([(1000, 10), (12, 1000)], dtype=[("height", "<u4"), ("width", "<u4")])
    state, (crops, scratch) = decoder.declare_state_and_memory(
        State(jit_mode=False, device=torch.device("cpu"), shape=(), dtype=np.dtype("u1")))
    assert crops.shape == (2, 32, 32, 3) and state.shape == (2, 32, 32, 3)
    assert scratch.shape == (12 * 1000 * 3,)


# ---------------------------------------------------------------- crop parameters


def _draws(height: int, width: int, n: int, view: int = 0) -> np.ndarray:
    scale, log_ratio = BYOL_VIEWS.crop_scale, BYOL_VIEWS.log_ratio
    return np.array([random_crop(height, width, *scale, *log_ratio, 0, 0, i, view) for i in range(n)])


# The largest crop with a 3/4..4/3 aspect ratio: the whole image, or 240 x 320 of a 500 x 240 portrait.
@pytest.mark.parametrize(("height", "width", "max_area"), [(300, 400, 1.0), (500, 240, 0.64), (224, 224, 1.0)])
def test_crop_parameters_follow_recipe(height: int, width: int, max_area: float) -> None:
    top, left, h, w = _draws(height, width, 20000).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    # w and h are rounded to whole pixels: allow one pixel of slack on each side.
    slack = (h + w + 1) / (height * width)
    assert (area >= 0.08 - slack).all() and (area <= 1.0).all()
    log_ratio = np.log(w / h)
    ratio_slack = 1.0 / np.minimum(h, w)
    assert (log_ratio >= math.log(3 / 4) - ratio_slack).all() and (log_ratio <= math.log(4 / 3) + ratio_slack).all()
    # The draws cover the whole recipe range, not a corner of it.
    assert area.min() < 0.085 and area.max() > 0.95 * max_area
    assert log_ratio.min() < math.log(3 / 4) + 0.02 and log_ratio.max() > math.log(4 / 3) - 0.02


def test_crop_fallback_for_extreme_aspect_ratio() -> None:
    # No 3/4..4/3 crop with 8% of the area fits a 10 x 1000 strip: the centred 4/3 crop is used.
    assert {tuple(c) for c in _draws(10, 1000, 50)} == {(0, (1000 - 13) // 2, 10, 13)}


def test_two_views_get_different_crops() -> None:
    view0, view1 = _draws(300, 400, 1000, view=0), _draws(300, 400, 1000, view=1)
    assert (view0 != view1).any(axis=1).all()


# ---------------------------------------------------------------- decoded crops


def _reference_crop(path: str, res: int) -> np.ndarray:
    """Source photo, resized like the writer (longest side MAX_RES), centre square, bilinear to res."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    ratio = MAX_RES / max(rgb.shape[:2])
    if ratio < 1:
        size = (np.array(rgb.shape[1::-1]) * ratio).astype(int)
        rgb = cv2.resize(rgb, tuple(size), interpolation=cv2.INTER_AREA)
    side = min(rgb.shape[:2])
    top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
    return cv2.resize(rgb[top : top + side, left : left + side], (res, res), interpolation=cv2.INTER_LINEAR)


@pytest.mark.slow
def test_decoded_jpeg_crops_match_sources(dirty_beton, dirty_corpus: str) -> None:
    loader = build_loader(beton_config(dirty_beton, 64, 8, drop_last=False), order="sequential")
    crops, labels = epoch_crops(loader)
    samples = scan_image_folder(dirty_corpus).samples
    assert labels.tolist() == [label for _, label in samples]
    errors = []
    for (path, _), pair in zip(samples, crops, strict=True):
        reference = _reference_crop(path, 64).astype(np.float64)
        for crop in pair.astype(np.float64):
            error = np.abs(crop - reference).mean()
            shifted = np.abs(crop[:, SHIFT_PX:] - reference[:, :-SHIFT_PX]).mean()
            assert error < SHIFT_ERROR_RATIO_MAX * shifted, f"{path}: {error:.2f} levels, {shifted:.2f} when shifted"
            errors.append((error, path))
    worst, worst_path = max(errors)
    assert worst < JPEG_MAE_MAX, f"{worst_path}: mean abs error {worst:.2f} levels"
    assert np.mean([e for e, _ in errors]) < JPEG_MAE_MEAN
