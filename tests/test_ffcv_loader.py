"""The FFCV two-view loader (pipelines/ffcv_loader.py) on a converted dirty photo corpus and on
Fashion-MNIST: rank sharding with exact pixels, reproducible epochs, batch layout, torch's thread
count, input checks before compiling, the not-in-memory order, and the shared loader contract
(`FfcvContract` in loader_contract.py). The converter is tested in test_ffcv_convert.py and the crop
decoder in test_ffcv_decoder.py.

FFCV compiles its pipeline per Loader (several seconds on 2 cores), so loaders are module fixtures.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv_betons import beton_config, epoch_crops
from loader_contract import FfcvContract

from datasources.fashion_mnist import load_fashion_mnist
from datasources.ffcv_convert import main
from pipelines.base import LoaderConfig
from pipelines.ffcv_loader import FfcvTwoViewLoader, build_loader
from pipelines.views import BYOL_VIEWS

pytestmark = pytest.mark.timeout(180)

FMNIST_LIMIT = 200


@pytest.fixture(scope="module")
def fmnist_beton(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("beton") / "fmnist.beton")
    assert main(["--src", "fashion-mnist", "--out", out, "--limit", str(FMNIST_LIMIT), "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def fmnist_shards(fmnist_beton: str) -> list[FfcvTwoViewLoader]:
    return [build_loader(beton_config(fmnist_beton, 28, 10, rank=rank, world_size=2, drop_last=False))
            for rank in (0, 1)]


@pytest.mark.slow
def test_ranks_partition_fashion_mnist_with_exact_pixels(fmnist_shards) -> None:
    images, labels = load_fashion_mnist("train")
    keep = np.unique(np.linspace(0, len(images) - 1, FMNIST_LIMIT).round().astype(int))
    source = {images[i].tobytes(): (i, labels[i]) for i in keep}
    seen = []
    for shard in fmnist_shards:
        crops, got_labels = epoch_crops(shard)
        assert len(crops) == FMNIST_LIMIT // 2 and len(shard) == FMNIST_LIMIT // 20
        for pair, label in zip(crops, got_labels, strict=True):
            # raw mode + whole-image 28 px crop: both views are the source image exactly, in 3 channels.
            assert (pair == pair[..., :1]).all() and (pair[0] == pair[1]).all()
            index, want = source[pair[0, :, :, 0].tobytes()]
            assert label == want
            seen.append(index)
    assert sorted(seen) == sorted(keep.tolist())  # disjoint shards that cover every sample


@pytest.fixture(scope="module")
def byol_loader(dirty_beton) -> FfcvTwoViewLoader:
    return build_loader(LoaderConfig(data=dirty_beton, batch_size=8, recipe=replace(BYOL_VIEWS, res=32)))


@pytest.mark.slow
def test_epochs_reproducible_and_views_differ(byol_loader: FfcvTwoViewLoader) -> None:
    byol_loader.set_epoch(3)
    first, labels_first = epoch_crops(byol_loader)
    byol_loader.set_epoch(3)
    again, labels_again = epoch_crops(byol_loader)
    byol_loader.set_epoch(4)
    other, _ = epoch_crops(byol_loader)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(labels_first, labels_again)
    assert not np.array_equal(first, other)
    assert (first[:, 0] != first[:, 1]).any(axis=(1, 2, 3)).all()  # the two crops of each image differ


def epoch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]


def test_an_epoch_left_early_stops_ffcvs_thread(byol_loader: FfcvTwoViewLoader) -> None:
    # A run that ends mid-epoch drops its iterator; FFCV's daemon thread decoding ahead must stop with it, or the
    # process can abort at exit inside that thread's numba loop (seen as exit -6 under load).
    batches = iter(byol_loader)
    next(batches)
    assert len(epoch_threads()) == 1
    batches.close()
    assert epoch_threads() == []


@pytest.mark.slow
def test_loader_yields_contract_batches(byol_loader: FfcvTwoViewLoader) -> None:
    batches = list(byol_loader)
    assert len(batches) == len(byol_loader) == 36 // 8
    for view1, view2, labels in batches:
        for view in (view1, view2):
            assert view.shape == (8, 3, 32, 32) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (8,)


@pytest.mark.slow
def test_loader_leaves_torch_thread_count_alone(dirty_beton) -> None:
    """ffcv sets torch's thread count to its worker count when a Loader is built and at each epoch;
    the training step must keep the threads it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = LoaderConfig(data=dirty_beton, batch_size=8, workers=1, recipe=replace(BYOL_VIEWS, res=16))
        loader = build_loader(cfg)
        assert torch.get_num_threads() == 2
        for _ in loader:
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(data="/nonexistent.beton"), "does not exist"),
        (dict(data="NOT_BETON"), "not a readable .beton"),
        (dict(batch_size=64), "larger than this rank's 36 samples"),
        (dict(batch_size=20, world_size=2), "larger than this rank's 18 samples"),
    ],
)
def test_loader_rejects_bad_input_before_compiling(dirty_beton, tmp_path, change, message) -> None:
    not_beton = tmp_path / "x.beton"
    not_beton.write_bytes(b"definitely not a beton file" * 10)
    change = {k: (str(not_beton) if v == "NOT_BETON" else v) for k, v in change.items()}
    cfg = replace(LoaderConfig(data=dirty_beton, batch_size=8), **change)
    with pytest.raises(ValueError, match=message):
        build_loader(cfg)


def test_loader_rejects_quasi_random_with_several_ranks(dirty_beton) -> None:
    with pytest.raises(ValueError, match="single-process only"):
        build_loader(LoaderConfig(data=dirty_beton, batch_size=8, world_size=2), order="quasi_random")


@pytest.mark.slow
def test_not_in_memory_reads_every_sample_once_in_quasi_random_order(dirty_beton) -> None:
    """in_memory=False: FFCV's QUASI_RANDOM order, process cache instead of the OS page cache; an
    epoch still yields every sample exactly once, in another order than the file's."""
    loader = build_loader(replace(beton_config(dirty_beton, 32, 8, drop_last=False), in_memory=False))
    assert type(loader.loader.traversal_order).__name__ == "QuasiRandom"
    assert loader.loader._args["os_cache"] is False
    crops, _ = epoch_crops(loader)
    in_file_order, _ = epoch_crops(build_loader(beton_config(dirty_beton, 32, 8, drop_last=False),
                                                order="sequential"))
    got, want = [c[0].tobytes() for c in crops], [c[0].tobytes() for c in in_file_order]
    assert sorted(got) == sorted(want) and got != want


class TestFfcvLoaderContract(FfcvContract):
    pass
