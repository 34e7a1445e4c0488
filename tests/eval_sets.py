"""Evaluation sets for the tests: random grey images held in memory, and the mark that skips a test when
the Fashion-MNIST files are not installed."""

from __future__ import annotations

import pytest
import torch

from datasources.fashion_mnist import FASHION_MNIST_DIR
from evaluation import ArraySet

needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")


def gray_set(n: int = 10, side: int = 12) -> ArraySet:
    g = torch.Generator().manual_seed(0)
    return ArraySet(torch.randint(0, 256, (n, side, side), dtype=torch.uint8, generator=g), torch.arange(n) % 2, 2)
