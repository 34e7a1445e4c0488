"""The README's main command (configs/fashion-mnist.toml), shortened, with every installed loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quickstart_runs import SHORT_RUN
from train_runs import run_train_here

from config import parse_config
from models.backbones import DEFAULT_WIDTH
from models.export import load_backbone
from pipelines.registry import LOADER_MODULES, is_available

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion-mnist.toml"
GPU_CONFIG = CONFIG.with_name("fashion-mnist-gpu.toml")


def test_the_default_config_is_the_built_in_recipe():
    cfg = parse_config(["--config", str(CONFIG)]).resolved()
    assert (cfg.data, cfg.arch, cfg.small_images, cfg.eval_every) == ("fashion-mnist", "resnet18", True, 1)
    assert (cfg.width, cfg.res, cfg.blur, cfg.base_lr, cfg.eta) == (8, 28, False, 1.0, 0.02)


def test_the_gpu_config_is_the_full_width_small_image_recipe():
    cfg = parse_config(["--config", str(GPU_CONFIG)]).resolved()
    assert (cfg.data, cfg.arch, cfg.width, cfg.res, cfg.small_images, cfg.blur) == \
        ("fashion-mnist", "resnet18", DEFAULT_WIDTH, 28, True, False)
    assert cfg.compile and cfg.precision == "bf16" and cfg.eval_every > 0 and cfg.eval_limit is None


@pytest.mark.timeout(600)
# The synthetic loader reads no data: 3.4 s on 2 cores in this process, not slow; every real loader is.
@pytest.mark.parametrize("loader", [pytest.param(name, marks=() if name == "synthetic" else pytest.mark.slow)
                                    for name in sorted(LOADER_MODULES)])
def test_short_built_in_run_with_each_installed_loader(loader, tmp_path, request, capsys):
    """In the built-in dataset's own cache ($FASTBYOL_CACHE, else ~/.cache/fastbyol), as the README's command,
    test_quickstart.py and the acceptance's fashion-mnist check read it: made once per machine (PNG folders,
    .beton), not once per test session; test_builtin.py makes and checks it from scratch on a small source.
    FFCV, the config's own loader, is the session's `python -m benchmark.quickstart` smoke run (the same
    train.py command and flags, from an empty cache: tests/quickstart_runs.py), not a second run."""
    if not is_available(loader):
        pytest.skip(f"loader {loader} is not installed")
    if loader == parse_config(["--config", str(CONFIG)]).resolved().loader:
        quickstart = request.getfixturevalue("quickstart_run")
        result, out = quickstart.proc, quickstart.run
        assert "train.py --config configs/fashion-mnist.toml " + " ".join(SHORT_RUN) in \
            json.loads(quickstart.result.read_text())["command"]
    else:
        # In this process (the same train.main the script runs, its output read from capsys): the quickstart run
        # above is the command as a separate process; a process start would add ~4.5 s of imports per loader.
        out = tmp_path
        result = run_train_here(capsys, "--config", str(CONFIG), "--loader", loader, *SHORT_RUN, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("on synthetic random views" if loader == "synthetic" else f"via the {loader} loader") in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # The symmetric loss is the sum of two directed losses, each 2 - 2 cos in [0, 4].
    assert all(0 < r["loss"] <= 8 and r["images_per_s"] > 0 for r in records)
    scores = json.loads((out / "eval.json").read_text())
    # 10 classes, 200 test images: chance is 10%. After 3 steps the BN running statistics are still
    # near their initial values, so the eval-mode kNN may sit at chance; the probe standardizes its
    # features and beats chance anyway.
    assert 0.2 < scores["linear_top1"] <= 1 and 0 <= scores["knn_top1"] <= 1
    # Baselines from the same run: the encoder at random init, and raw pixels (a strong probe here).
    assert 0.1 < scores["random_init_linear_top1"] <= 1 and 0.5 < scores["pixels_linear_top1"] <= 1
    assert "raw pixels" in result.stdout
    # The exported narrow backbone loads into a model of its own width (read from the file).
    cfg = parse_config(["--config", str(CONFIG)]).resolved()
    encoder, info = load_backbone(out / "backbone.pt")
    assert encoder.conv1.out_channels == info.width == cfg.width < DEFAULT_WIDTH and info.res == cfg.res
