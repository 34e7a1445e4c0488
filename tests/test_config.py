"""config.py: the recipe's and the machine's defaults, and config files under the command line."""

from __future__ import annotations

import os

import pytest
import torch

from config import TrainConfig, build_parser, config_from_args, parse_config


def test_config_defaults_follow_the_recipe():
    cfg = config_from_args(build_parser().parse_args(["--epochs", "1000"])).resolved()
    assert (cfg.base_lr, cfg.weight_decay, cfg.tau_base) == (0.2, 1.5e-6, 0.996)
    short = TrainConfig(epochs=40).resolved()
    assert (short.base_lr, short.weight_decay, short.tau_base, short.eta) == (0.45, 1e-6, 0.97, 1e-3)
    assert short.small_images is False and short.blur is True
    # Small images take solo-learn's CIFAR recipe: no blur, lr 1.0, wd 1e-5, eta 0.02, tau 0.99.
    small = TrainConfig(epochs=40, res=28).resolved()
    assert (small.base_lr, small.weight_decay, small.tau_base, small.eta) == (1.0, 1e-5, 0.99, 0.02)
    assert small.small_images is True and small.blur is False
    # Each stays overridable, and an explicit --no-small-images gives the ImageNet recipe at any size.
    assert TrainConfig(res=28, blur=True, eta=0.01).resolved().blur is True
    assert TrainConfig(res=28, small_images=False).resolved().base_lr == 0.45
    assert TrainConfig().jitter == "official" and parse_config(["--jitter", "torchvision"]).jitter == "torchvision"
    assert build_parser().parse_args(["--no-compile"]).compile is False


def test_defaults_follow_the_machine_and_the_data(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = TrainConfig().resolved()
    # A real loader, never synthetic: DALI (installed here; its CPU mode) for folders and built-ins.
    assert cpu.loader == "dali" and TrainConfig(data="x.beton").resolved().loader == "ffcv"
    assert cpu.compile is False  # compiling takes minutes on a few cores
    cores = len(os.sched_getaffinity(0))
    assert cpu.workers == cores and TrainConfig(processes=2).resolved().workers == max(1, cores // 2)
    assert TrainConfig(loader="torchvision", workers=1, compile=True).resolved().workers == 1


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_then_command_line(tmp_path, suffix):
    body = ('arch = "resnet34"\nbatch-size = 512\nbase_lr = 1\ncompile = false\n' if suffix == ".toml"
            else "arch: resnet34\nbatch-size: 512\nbase_lr: 1\ncompile: false\n")
    path = tmp_path / f"run{suffix}"
    path.write_text(body)
    cfg = parse_config(["--config", str(path), "--batch-size", "1024"])
    assert (cfg.arch, cfg.batch_size, cfg.base_lr, cfg.compile) == ("resnet34", 1024, 1.0, False)
    assert isinstance(cfg.base_lr, float)


def test_choices_come_from_the_registries():
    from models.backbones import ARCHS
    from models.step import AUTOCAST_DTYPES
    from optim.factory import OPTIMIZERS
    from pipelines.registry import LOADER_MODULES
    from pipelines.views import JITTER_MODES

    choices = {action.dest: action.choices for action in build_parser()._actions}
    assert choices["loader"] == tuple(LOADER_MODULES) and choices["arch"] == tuple(ARCHS)
    assert choices["optimizer"] == tuple(OPTIMIZERS) and choices["precision"] == tuple(AUTOCAST_DTYPES)
    assert choices["jitter"] == tuple(JITTER_MODES)


def test_resume_rules_live_in_the_options():
    from config import QUIET, REFUSED, options_on_resume

    # What shapes the saved tensors (the networks and the optimizer state) cannot change on resume...
    assert sorted(options_on_resume(REFUSED)) == ["arch", "hidden_dim", "optimizer", "proj_dim", "small_images",
                                                  "width"]
    # ...and where and how fast the run goes, and how often it logs, changes without a note.
    assert sorted(options_on_resume(QUIET)) == ["compile", "device", "gpus", "log_every", "out", "processes",
                                                "resume", "workers"]
