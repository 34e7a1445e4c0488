"""The evaluation's data sets (evaluation/data.py): folder images decode through open_rgb (16-bit PNGs
are not white), a file deleted after the scan is stood in for by a grey image with a warning, and the
built-in splits print their image counts; validation classes are matched by name, --eval-limit keeps
evenly spaced samples, and the decode workers leave stop signals to the main process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from eval_sets import gray_set
from image_files import class_folders, gray16_png, png_folder
from PIL import Image

from evaluation.data import eval_splits

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


def test_val_classes_are_matched_by_name(tmp_path) -> None:
    train = class_folders(tmp_path / "train", ["cat", "dog", "fox"])
    (tmp_path / "val").mkdir()
    val = class_folders(tmp_path / "val", ["fox"])  # one class: by position it would be label 0 ("cat")
    train_set, val_set = eval_splits(train, val, workers=0)
    assert val_set.num_classes == 3 and val_set.labels.tolist() == [2, 2, 2]


def test_limits_keep_evenly_spaced_samples(tmp_path) -> None:
    data = gray_set(n=10)
    assert data.limit(4).labels.tolist() == data.labels[[0, 3, 6, 9]].tolist()
    assert data.limit(None) is data and data.limit(50) is data
    for label in range(2):
        (tmp_path / f"class_{label}").mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (80 * i, 100 * label, 0)).save(tmp_path / f"class_{label}" / f"{i}.png")
    train, test = eval_splits(str(tmp_path), str(tmp_path), train_limit=3)
    assert len(train) == 3 and len(test) == 6
    assert [label for _, label in train.samples] == [0, 0, 1]  # linspace(0, 5, 3) -> 0, 2, 5
    train.workers = 0
    (images, labels), = list(train.batches(8, res=8))
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 0, 1]
    assert images[2, 1].float().mean().item() == pytest.approx(100, abs=1)  # green channel of class 1


def test_folder_workers_leave_stop_signals_to_the_main_process(tmp_path, monkeypatch) -> None:
    """A SIGTERM to the process group must not kill the evaluation's decode workers under the trainer:
    each worker ignores SIGTERM and SIGINT (read inside real worker processes), and there are as many
    workers as usable cores by default."""
    import os
    import signal

    import evaluation.data as data

    train, _ = eval_splits(class_folders(tmp_path / "train", ["a", "b"], per_class=2),
                           class_folders(tmp_path / "val", ["a", "b"], per_class=1))
    assert train.workers == len(os.sched_getaffinity(0))

    def handlers_in_worker(self, i: int) -> tuple[torch.Tensor, int, str]:
        ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT))
        return torch.zeros(3, 8, 8), int(ignored), ""

    monkeypatch.setattr(data._CenterCropped, "__getitem__", handlers_in_worker)
    train.workers = 2
    labels = torch.cat([labels for _, labels in train.batches(batch_size=2, res=8)])
    assert labels.tolist() == [1, 1, 1, 1]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process still stops on it
