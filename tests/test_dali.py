"""The DALI loader (CPU operators here; the same graph runs with device="mixed" on CUDA)."""

from __future__ import annotations

import pytest
import torch
from loader_contract import LoaderContract

from pipelines.base import LoaderConfig
from pipelines.views import BYOL_VIEWS

pytest.importorskip("nvidia.dali", reason="DALI is an optional extra")

from pipelines.dali_loader import DaliLoaderError, build_loader  # noqa: E402


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
