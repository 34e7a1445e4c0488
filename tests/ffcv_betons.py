"""FFCV test data shared by the converter, decoder and loader tests (test_ffcv_convert.py,
test_ffcv_decoder.py, test_ffcv_loader.py): the dirty corpus converted once per session at MAX_RES,
a loader config with whole-image crops, and a loader's epoch read back as uint8 crops."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from datasources.ffcv_convert import main
from pipelines.base import LoaderConfig
from pipelines.views import BYOL_VIEWS

if TYPE_CHECKING:  # the converter's tests need no loader (nor ffcv's numba-compiling import)
    from pipelines.ffcv_loader import FfcvTwoViewLoader

MAX_RES = 160
WHOLE = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # centre square crop: comparable to a reference

_dirty_betons: dict[str, str] = {}


def dirty_beton_of(dirty_corpus: str, tmp_path_factory) -> str:
    """The dirty corpus as a .beton (longest side MAX_RES), converted on first use in the session: the
    body of each test module's `dirty_beton` fixture."""
    if dirty_corpus not in _dirty_betons:
        out = str(tmp_path_factory.mktemp("beton") / "dirty.beton")
        assert main(["--src", dirty_corpus, "--out", out, "--max-res", str(MAX_RES), "--workers", "2"]) == 0
        _dirty_betons[dirty_corpus] = out
    return _dirty_betons[dirty_corpus]


def beton_config(data: str, res: int, batch_size: int, **kwargs) -> LoaderConfig:
    return LoaderConfig(data=data, batch_size=batch_size, recipe=replace(BYOL_VIEWS, res=res, **WHOLE), **kwargs)


def epoch_crops(loader: FfcvTwoViewLoader) -> tuple[np.ndarray, np.ndarray]:
    crops, labels = zip(*((c.numpy().copy(), lab.numpy().copy()) for c, lab in loader.crops()), strict=True)
    return np.concatenate(crops), np.concatenate(labels)
