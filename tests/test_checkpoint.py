"""runtime/checkpoint.py: atomic checksummed files, corrupt-file fallback, keep-last-K, RNG states, export, and
the run's save cadence and clock (RunCheckpointer)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_models import tiny_byol

from models.backbones import build_backbone
from models.export import BackboneInfo, load_backbone
from optim.factory import build_optimizer
from runtime.checkpoint import (
    CheckpointDir,
    CorruptCheckpoint,
    Diverged,
    RunCheckpointer,
    export_backbone,
    load_checkpoint,
    rng_state,
    run_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from runtime.distributed import World


@pytest.fixture
def lars_state() -> dict:
    """A real optimizer state: the fused LARS with a device-tensor lr and momentum buffers."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer("lars", net.parameters(), lr=0.1, weight_decay=1e-6)
    net(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    return {"step": 7, "net": net.state_dict(), "optimizer": opt.state_dict(), "rng": [rng_state()],
            "config": {"arch": "resnet18", "min_scale": None}}


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_with_weights_only_and_no_temp_files(tmp_path, lars_state):
    path = tmp_path / "ckpt-000000007.pt"
    save_checkpoint(path, lars_state)
    assert_same(load_checkpoint(path), lars_state)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_trailer"])
def test_damaged_file_is_detected(tmp_path, lars_state, damage):
    path = tmp_path / "ckpt-000000001.pt"
    save_checkpoint(path, lars_state)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        data[len(data) // 3] ^= 0x40
    else:
        data = data[:-40]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        load_checkpoint(path)


def test_keeps_last_k_and_falls_back_past_a_corrupt_newest(tmp_path, lars_state, capsys):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep=2)
    for step in (10, 20, 30):
        ckpts.save(step, {**lars_state, "step": step})
    assert [p.name for p in ckpts.paths()] == ["ckpt-000000030.pt", "ckpt-000000020.pt"]

    newest = ckpts.paths()[0]
    newest.write_bytes(newest.read_bytes()[:1000])  # a crash mid-copy or a broken disk
    path, state = ckpts.load_newest_valid()
    assert path.name == "ckpt-000000020.pt" and state["step"] == 20
    assert "skipping checkpoint" in capsys.readouterr().err

    ckpts.paths()[1].write_bytes(b"")
    with pytest.raises(CorruptCheckpoint, match="none of the 2"):
        ckpts.load_newest_valid()
    assert CheckpointDir(tmp_path / "empty", keep=2).load_newest_valid() is None


def test_rng_state_restores_every_generator():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_export_backbone_writes_the_runs_encoder_with_the_runs_form(tmp_path):
    torch.manual_seed(0)
    encoder, _ = build_backbone("resnet34", small_images=True, width=4)
    config = {"arch": "resnet34", "width": 4, "small_images": True, "res": 32, "batch_size": 8,
              "zero_init_residual": True}
    info = export_backbone(tmp_path / "backbone.pt", encoder, config)
    loaded, read = load_backbone(tmp_path / "backbone.pt")
    assert info == read == BackboneInfo("resnet34", 4, True, 32, 32, zero_init_residual=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values(),
                                                 strict=True))


ONE_PROCESS = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))


def _checkpointer(tmp_path, byol, **cadence):
    optimizer = build_optimizer("sgd", byol.online.parameters(), lr=0.1, weight_decay=0.0)
    return RunCheckpointer(run_checkpoints(tmp_path, keep=2), ONE_PROCESS, byol, optimizer, None,
                           steps_per_epoch=4, config={"arch": "tiny"}, **cadence)


def test_run_checkpointer_saves_on_its_cadence_and_carries_the_clock(tmp_path, monkeypatch):
    import runtime.checkpoint as checkpoint


    now = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now[0])
    saver = _checkpointer(tmp_path, tiny_byol(), every_epochs=2, every_minutes=1.5, elapsed_before=30.0)
    assert [saver.epoch_due(epoch) for epoch in range(4)] == [False, True, False, True]
    now[0] += 89
    assert not saver.time_due() and saver.elapsed_s() == 119.0
    now[0] += 1  # 90 s = 1.5 minutes since the start
    assert saver.time_due()
    saver.save(step=6)
    assert not saver.time_due()  # the clock for the next time-based save restarts at a save
    [path] = run_checkpoints(tmp_path, keep=2).paths()
    state = load_checkpoint(path)
    assert (path.name, state["step"], state["epoch"], state["steps_into_epoch"]) == ("ckpt-000000006.pt", 6, 1, 2)
    assert state["elapsed_s"] == 120.0 and state["config"] == {"arch": "tiny"} and len(state["rng"]) == 1
    off = _checkpointer(tmp_path, tiny_byol(), every_epochs=0, every_minutes=0)
    now[0] += 10_000
    assert not off.epoch_due(1) and not off.time_due()


def test_run_checkpointer_refuses_non_finite_weights(tmp_path):
    byol = tiny_byol()
    with torch.no_grad():
        next(byol.online.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(Diverged, match="non-finite at step 3"):
        _checkpointer(tmp_path, byol, every_epochs=1, every_minutes=0).save(step=3)
    assert not run_checkpoints(tmp_path, keep=2).paths()
