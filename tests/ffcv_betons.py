"""FFCV test data shared by the converter, decoder and loader tests (test_ffcv_convert.py,
test_ffcv_decoder.py, test_ffcv_loader.py): the size conftest's `dirty_beton` is converted at,
a loader config with whole-image crops, and a loader's epoch read back as uint8 crops."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from pipelines.base import LoaderConfig
from pipelines.views import BYOL_VIEWS

if TYPE_CHECKING:  # the converter's tests need no loader (nor ffcv's numba-compiling import)
    from pipelines.ffcv_loader import FfcvTwoViewLoader

MAX_RES = 160  # the longest side of conftest's `dirty_beton`
WHOLE = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # centre square crop: comparable to a reference


def beton_config(data: str, res: int, batch_size: int, **kwargs) -> LoaderConfig:
    return LoaderConfig(data=data, batch_size=batch_size, recipe=replace(BYOL_VIEWS, res=res, **WHOLE), **kwargs)


def epoch_crops(loader: FfcvTwoViewLoader) -> tuple[np.ndarray, np.ndarray]:
    crops, labels = zip(*((c.numpy().copy(), lab.numpy().copy()) for c, lab in loader.crops()), strict=True)
    return np.concatenate(crops), np.concatenate(labels)
