"""train.py end to end on CPU with the synthetic loader, and its up-front argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config import TrainConfig, build_parser, config_from_args


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_synthetic_cpu_run_prints_loss_and_throughput():
    result = run_train("--loader", "synthetic", "--device", "cpu", "--arch", "resnet18", "--res", "16",
                       "--batch-size", "8", "--steps", "4", "--log-every", "2", "--no-compile",
                       "--hidden-dim", "64")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and "loss" in lines[-1] and "img/s" in lines[-1]


def test_bad_arguments_give_one_clear_line():
    result = run_train("--loader", "synthetic", "--device", "cpu", "--arch", "resnet18", "--res", "4",
                       "--steps", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: --res")


def test_config_defaults_follow_the_recipe():
    cfg = config_from_args(build_parser().parse_args(["--epochs", "1000"])).resolved()
    assert (cfg.base_lr, cfg.weight_decay, cfg.tau_base) == (0.2, 1.5e-6, 0.996)
    short = TrainConfig(epochs=40, res=32).resolved()
    assert (short.base_lr, short.weight_decay, short.tau_base, short.small_images) == (0.45, 1e-6, 0.97, True)
    assert build_parser().parse_args(["--no-compile"]).compile is False
