"""No host sync in the hot path, proven on CPU with tests/host_sync.py (CUDA tests use the sync debug mode).

Covered: the EMA update, LARS, the whole eager BYOL step, gpu_augment, and each loader's per-batch
hand-off (the ops the training thread runs to turn a loader's output into device views).
"""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncRecorder, assert_no_host_sync
from step_inputs import fixed_views, make_step

from models.byol import ema_update_
from optim.lars import LARS
from pipelines.base import LoaderConfig
from pipelines.gpu_augment import TwoViewAugment
from pipelines.views import BYOL_VIEWS


@pytest.mark.parametrize(
    "syncing",
    [
        pytest.param(lambda t: t.sum().item(), id="item"),
        pytest.param(lambda t: float(t.sum()), id="float()"),
        pytest.param(lambda t: bool(t.sum() > 0), id="bool()"),
        pytest.param(lambda t: t[t > 0], id="boolean mask"),
        pytest.param(lambda t: t.nonzero(), id="nonzero"),
        pytest.param(lambda t: torch.tensor([1.0, 2.0], device=t.device), id="torch.tensor from a list"),
        pytest.param(lambda t: torch.linalg.inv(torch.eye(3, device=t.device)), id="linalg.inv"),
        # The EMA update as it was: a 0-d tensor weight is read back as a Python scalar.
        pytest.param(lambda t: torch._foreach_lerp_([t.clone()], [t], 1 - torch.tensor(0.5).squeeze()),
                     id="foreach_lerp with a tensor weight"),
    ],
)
def test_recorder_catches_host_syncs(syncing) -> None:
    with HostSyncRecorder() as recorder:
        syncing(torch.ones(4))
    assert recorder.syncs, recorder.ops


def test_recorder_passes_device_side_work() -> None:
    x, tau = torch.ones(4), torch.tensor(0.99)
    assert_no_host_sync(lambda: torch._foreach_mul_([x], 1 - tau) or torch.where(x > 0, x, -x).sum())


def test_ema_update_has_no_host_sync() -> None:
    target, online = [torch.zeros(3, 2), torch.zeros(4)], [torch.ones(3, 2), torch.ones(4)]
    assert_no_host_sync(ema_update_, target, online, torch.tensor(0.75))
    for t in target:  # and it still is the EMA: 0.75 * 0 + 0.25 * 1
        torch.testing.assert_close(t, torch.full_like(t, 0.25))


def test_lars_step_has_no_host_sync() -> None:
    params = [torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last).requires_grad_(),
              torch.randn(5, 3, requires_grad=True), torch.zeros(4, 2, requires_grad=True),
              torch.randn(6, requires_grad=True)]
    opt = LARS(params, lr=torch.tensor(0.1), weight_decay=1e-6)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step allocates momentum buffers
    assert_no_host_sync(opt.step)


def test_whole_eager_step_has_no_host_sync() -> None:
    v1, v2 = fixed_views()
    step = make_step(compile=False)
    step(v1, v2, lr=0.5, tau=0.99)  # the first step allocates momentum buffers
    assert_no_host_sync(step, v1, v2, lr=0.4, tau=0.98)


def test_gpu_augment_has_no_host_sync() -> None:
    augment = TwoViewAugment(BYOL_VIEWS.with_overrides(res=32))
    crops = torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8)
    view1, view2 = assert_no_host_sync(augment, crops)
    assert view1.shape == view2.shape == (4, 3, 32, 32)


def _first_batch_without_sync(loader) -> None:
    """The training thread's share of one batch (the loader's own threads and processes are not
    seen by the recorder, which is per thread: exactly the hand-off is checked)."""
    batches = iter(loader)
    next(batches)  # warm up: worker start, pipeline build
    view1, view2, labels = assert_no_host_sync(next, batches)
    assert view1.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64


@pytest.mark.timeout(120)
def test_dali_hand_off_has_no_host_sync(photo_corpus) -> None:
    pytest.importorskip("nvidia.dali")
    from pipelines.dali_loader import build_loader

    _first_batch_without_sync(build_loader(LoaderConfig(photo_corpus, batch_size=4,
                                                        recipe=BYOL_VIEWS.with_overrides(res=32))))


@pytest.mark.timeout(120)
def test_torchvision_hand_off_has_no_host_sync(photo_corpus) -> None:
    from pipelines.torchvision_loader import build_loader

    _first_batch_without_sync(build_loader(LoaderConfig(photo_corpus, batch_size=4, workers=1,
                                                        recipe=BYOL_VIEWS.with_overrides(res=32))))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ffcv_hand_off_has_no_host_sync(photo_corpus, tmp_path) -> None:
    pytest.importorskip("ffcv")
    from datasources.ffcv_convert import main as convert
    from pipelines.ffcv_loader import build_loader

    beton = str(tmp_path / "photos.beton")
    assert convert(["--src", photo_corpus, "--out", beton, "--max-res", "64", "--workers", "2"]) == 0
    _first_batch_without_sync(build_loader(LoaderConfig(beton, batch_size=4, workers=1,
                                                        recipe=BYOL_VIEWS.with_overrides(res=32))))

