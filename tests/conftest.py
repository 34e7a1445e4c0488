"""Shared fixtures: small real-photo corpora built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from benchmark.make_corpus import make_corpus


@pytest.fixture(scope="session")
def photo_corpus(tmp_path_factory) -> str:
    """64 ImageNet-like JPEGs (real photos, ~400x350) in 4 classes, no bad files."""
    return str(make_corpus(tmp_path_factory.mktemp("corpus") / "clean", images=64, classes=4, seed=1))


@pytest.fixture(scope="session")
def dirty_corpus(tmp_path_factory) -> str:
    """32 real-photo JPEGs in 4 classes plus, in class_000, odd-but-valid and unreadable files
    (see benchmark.make_corpus.ODD_BUT_VALID / UNREADABLE)."""
    return str(make_corpus(tmp_path_factory.mktemp("corpus") / "dirty", images=32, classes=4,
                           with_bad_files=True, seed=2))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Keep CPU tests deterministic in speed on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
