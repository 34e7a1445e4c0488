"""The DALI loader (pipelines/dali_loader.py; CPU operators here, the same graph runs with device="mixed"
on CUDA): the loader contract, output dtypes, wrapped pipeline errors, and recovery from files that are
deleted or become undecodable after the scan (dropped with a warning, the epoch goes on), failures no
file can be found for (one clear error), and a GIF named .JPEG (left out with a warning)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from image_files import misnamed_folder, png_folder
from loader_contract import LoaderContract
from PIL import Image

from datasources.imagefolder import scan_image_folder
from pipelines.base import LoaderConfig
from pipelines.views import BYOL_VIEWS

pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")

from pipelines.dali_loader import DaliLoaderError, build_loader  # noqa: E402

RES = 16


class TestDaliLoader(LoaderContract):
    module = "pipelines.dali_loader"


@pytest.mark.timeout(60)
def test_float16_output_is_channels_last(photo_corpus):
    loader = build_loader(LoaderConfig(photo_corpus, batch_size=4, recipe=BYOL_VIEWS.with_overrides(res=32),
                                       dtype=torch.float16))
    view1, _, _ = next(iter(loader))
    assert view1.dtype == torch.float16 and view1.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.timeout(60)
def test_unsupported_dtype_is_a_clear_error(photo_corpus):
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        build_loader(LoaderConfig(photo_corpus, batch_size=4, dtype=torch.float64))


@pytest.mark.timeout(60)
def test_pipeline_errors_are_wrapped(photo_corpus, monkeypatch):
    import pipelines.dali_loader as dali

    def broken(*args, **kwargs):
        raise RuntimeError("Critical error in pipeline:\nencountered:\nsomething inside DALI broke\n")

    monkeypatch.setattr(dali, "DALIGenericIterator", broken)
    with pytest.raises(DaliLoaderError, match="could not build the DALI pipeline .*: something inside DALI"):
        build_loader(LoaderConfig(photo_corpus, batch_size=4))


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_gpu_pipeline_decodes_on_the_device(photo_corpus):
    cfg = LoaderConfig(photo_corpus, batch_size=8, recipe=BYOL_VIEWS.with_overrides(res=64),
                       device=torch.device("cuda"), dtype=torch.bfloat16)
    loader = build_loader(cfg)
    for view1, view2, labels in loader:
        for view in (view1, view2):
            assert view.is_cuda and view.dtype == torch.bfloat16
            assert view.is_contiguous(memory_format=torch.channels_last)
        assert labels.is_cuda and labels.dtype == torch.int64
    assert len(loader) == 64 // 8


# ---------------------------------------------------------------- files that change or lie after the scan


def _dali_loader(root: Path, **overrides):
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    return build_loader(LoaderConfig(str(root), batch_size=4, workers=1, drop_last=False,
                                     recipe=BYOL_VIEWS.with_overrides(res=RES), **overrides))


@pytest.mark.timeout(120)
def test_dali_drops_files_deleted_after_the_scan_and_goes_on(tmp_path, caplog):
    """The reader's error names one deleted file; the loader drops every deleted one (warning with each
    name), rebuilds and finishes the epoch. Enough files that DALI has not read them all ahead."""
    paths = png_folder(tmp_path, count=80)
    loader = _dali_loader(tmp_path)
    deleted = paths[41::2]
    for path in deleted:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="datasources.imagefolder"):
        batches = [labels.numel() for _, _, labels in loader]
    assert sorted(path for path, _ in loader.skipped) == sorted(map(str, deleted))
    assert len(loader.index.samples) == 80 - len(deleted) and len(batches) == len(loader)
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert all(str(path) in messages for path in deleted)
    assert sum(labels.numel() for _, _, labels in loader) == 80 - len(deleted)  # the next epoch: all the rest


@pytest.mark.timeout(120)
def test_dali_drops_a_file_that_becomes_undecodable_after_the_scan(tmp_path, caplog):
    """DALI's decoder names no file: the loader re-checks the files and finds the one that is now a GIF."""
    paths = png_folder(tmp_path, count=80)
    loader = _dali_loader(tmp_path)
    for path in paths[40:]:
        Image.open(path).convert("P").save(path, format="GIF")
    with caplog.at_level(logging.WARNING, logger="datasources.imagefolder"):
        total = sum(labels.numel() for _, _, labels in loader)
    assert total > 0 and sorted(path for path, _ in loader.skipped) == sorted(map(str, paths[40:]))
    assert "GIF file, which DALI cannot decode" in loader.skipped[0][1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("operator", "failure", "expected"), [
    # A decode failure no file can be found for: one line pointing to the deep check and the PIL loader.
    ("decoders.image", "nvImageCodec failure: '#4'",
     r"nvImageCodec failure: .#4.; no file of it .*--deep-check .*--loader torchvision"),
    # A failure that is not about a file is reported as it is.
    ("gaussian_blur", "out of memory", r"^DALI failed while loading .*: out of memory$"),
])
def test_dali_failure_without_a_file_to_drop_is_one_clear_error(tmp_path, monkeypatch, operator, failure, expected):
    import pipelines.dali_loader as dali

    png_folder(tmp_path)
    loader = _dali_loader(tmp_path)

    def failing():
        raise RuntimeError(f"Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.{operator}`,\n"
                           f"encountered:\n{failure}\n")
        yield

    monkeypatch.setattr(loader, "_iterator", failing())
    with pytest.raises(dali.DaliLoaderError, match=expected):
        next(iter(loader))
    assert not loader.skipped


@pytest.mark.timeout(120)
def test_dali_drops_files_deleted_before_its_first_batch(tmp_path, caplog):
    """The iterator decodes its first batch while it is made: a failure there is recovered the same way."""
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from pipelines.dali_loader import DaliTwoViewLoader

    paths = png_folder(tmp_path, count=12)
    index = scan_image_folder(tmp_path)
    for path in paths[::2]:
        path.unlink()
    loader = DaliTwoViewLoader(LoaderConfig(str(tmp_path), batch_size=4, workers=1, drop_last=False,
                                            recipe=BYOL_VIEWS.with_overrides(res=RES)), index)
    assert sorted(path for path, _ in loader.skipped) == sorted(map(str, paths[::2]))
    assert sum(labels.numel() for _, _, labels in loader) == 6


@pytest.mark.timeout(120)
def test_dali_finds_a_corrupt_body_by_decoding_a_small_folder(tmp_path):
    """A PNG cut short but ending in 'IEND' passes the scan's tail check; DALI's decoder fails on it
    without naming it, so the loader decodes the (small) folder with PIL to find it."""
    pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")
    from pipelines.dali_loader import DaliTwoViewLoader

    paths = png_folder(tmp_path, count=12)
    index = scan_image_folder(tmp_path)
    cut = paths[0].read_bytes()
    for path in paths[:6]:
        path.write_bytes(cut[:60] + b"IEND")
    loader = DaliTwoViewLoader(LoaderConfig(str(tmp_path), batch_size=4, workers=1, drop_last=False,
                                            recipe=BYOL_VIEWS.with_overrides(res=RES)), index)
    assert sorted(path for path, _ in loader.skipped) == sorted(map(str, paths[:6]))
    assert "cannot decode" in loader.skipped[0][1]
    assert sum(labels.numel() for _, _, labels in loader) == 6


@pytest.mark.timeout(120)
def test_dali_leaves_out_a_gif_named_jpeg_with_a_warning_and_reads_the_rest(tmp_path, caplog):
    files = misnamed_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datasources.imagefolder"):
        loader = _dali_loader(tmp_path)
    assert [path for path, _ in loader.bad_files] == [str(files["GIF"])]
    assert "GIF image named .JPEG: DALI cannot decode GIF" in loader.bad_files[0][1]
    assert str(files["GIF"]) in caplog.text
    assert sum(labels.numel() for _, _, labels in loader) == 4 + 2  # the WebP and PNG named .JPEG decode
