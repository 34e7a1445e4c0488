"""The evaluation's data sets (evaluation/data.py): folder images decode through open_rgb (16-bit PNGs
are not white), a file deleted after the scan is stood in for by a grey image with a warning, and the
built-in splits print their image counts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from image_files import gray16_png, png_folder

RES = 16


@pytest.mark.timeout(60)
def test_16_bit_png_is_not_white_in_the_evaluation_set(tmp_path):
    """The evaluation's centre crops decode through open_rgb too (16-bit PNGs used to come out 255)."""
    from evaluation.data import FolderSet

    for label in range(2):
        (tmp_path / f"class_{label}").mkdir()
        gray16_png(tmp_path / f"class_{label}" / "gray16.png")
    images, _ = next(FolderSet(str(tmp_path), workers=0).batches(2, 16))
    assert 100 < images.float().mean() < 155  # a 0..65535 ramp: mid-grey on average, not 255


@pytest.mark.timeout(60)
def test_evaluation_set_stands_a_grey_image_in_for_a_file_deleted_after_the_scan(tmp_path, caplog):
    """Every rank reads the labels from the sample list, so the sample stays, grey, with a warning."""
    from evaluation.data import STAND_IN_GREY, FolderSet

    paths = png_folder(tmp_path, count=4)
    data = FolderSet(str(tmp_path), workers=0)
    paths[1].unlink()
    with caplog.at_level(logging.WARNING, logger="datasources.imagefolder"):
        images, labels = next(data.batches(4, RES))
    assert len(images) == len(labels) == 4
    gone = [path for path, _ in data.samples].index(str(paths[1]))
    assert (images[gone] == STAND_IN_GREY).all()
    assert data.skipped[0][0] == str(paths[1]) and str(paths[1]) in caplog.text


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir() and "FASHION_MNIST_DIR" not in os.environ,
                    reason="Fashion-MNIST not installed")
def test_built_in_evaluation_splits_print_their_counts(capsys):
    from evaluation.data import eval_splits

    train, test = eval_splits("fashion-mnist", None, 100, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval ")]
    assert len(lines) == 2 and lines[0].startswith(f"eval train: {len(train)} of 60,000 images in 10 classes")
    assert lines[1].startswith(f"eval test: {len(test):,} images in 10 classes of Fashion-MNIST test")
