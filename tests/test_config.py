"""config.py: the recipe's and the machine's defaults, and config files under the command line."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from config import TrainConfig, build_parser, config_from_args, option_flag, parse_config
from optim.schedules import warmup_steps
from pipelines.views import BYOL_VIEWS


def test_config_defaults_follow_the_recipe():
    cfg = config_from_args(build_parser().parse_args(["--epochs", "1000", "--data", "photos"])).resolved()
    assert (cfg.arch, cfg.res, cfg.base_lr, cfg.weight_decay, cfg.tau_base) == ("resnet50", 224, 0.2, 1.5e-6, 0.996)
    short = TrainConfig(epochs=40, res=224).resolved()
    assert (short.base_lr, short.weight_decay, short.tau_base, short.eta) == (0.45, 1e-6, 0.97, 1e-3)
    assert short.small_images is False and short.blur is True
    assert short.lr_1d_scale == 1.0  # the official code's: biases and norm weights at the full lr
    assert short.zero_init_residual is False  # torchvision's initialisation
    # Small images take solo-learn's CIFAR recipe (no blur, lr 1.0, eta 0.02, tau 0.99) with the quickstart's
    # measured 1-D lr scale 0.25 and weight decay 4e-5 (docs/recipe.md).
    small = TrainConfig(epochs=40, res=28).resolved()
    assert (small.base_lr, small.weight_decay, small.tau_base, small.eta) == (1.0, 4e-5, 0.99, 0.02)
    assert small.lr_1d_scale == 0.25
    assert small.zero_init_residual is True  # measured on the quickstart's seeds (docs/recipe.md)
    # Crops of at least a fifth of a small image (measured, docs/recipe.md); the recipe's 0.08 otherwise.
    assert small.min_scale == 0.2 and short.min_scale == 0.08
    assert TrainConfig(res=28, min_scale=0.08).resolved().min_scale == 0.08
    assert TrainConfig(res=28, zero_init_residual=False).resolved().zero_init_residual is False
    assert small.small_images is True and small.blur is False
    # Each stays overridable, and an explicit --no-small-images gives the ImageNet recipe at any size.
    assert TrainConfig(res=28, blur=True, eta=0.01).resolved().blur is True
    assert TrainConfig(res=28, small_images=False).resolved().base_lr == 0.45
    assert TrainConfig(res=28, small_images=False).resolved().arch == "resnet50"
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


def test_the_built_in_dataset_gets_the_small_image_recipe_at_its_own_size():
    # Its images are 28 x 28 (the idx header says so): a bare `train.py` must not upsample them 8x per side.
    bare = parse_config([]).resolved()
    assert (bare.data, bare.res, bare.small_images, bare.arch, bare.blur) == ("fashion-mnist", 28, True, "resnet18",
                                                                               False)
    assert parse_config(["--data", "fashion-mnist:/srv/fmnist"]).resolved().res == 28
    assert parse_config(["--data", "photos", "--res", "96"]).resolved().arch == "resnet50"


# The recipe by run length, written out by hand from docs/recipe.md: epochs -> (base lr, weight decay, tau).
RECIPE = {40: (0.45, 1e-6, 0.97), 41: (0.45, 1e-6, 0.99), 299: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
          999: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}


def help_of(flag: str) -> str:
    text = " ".join(build_parser().format_help().split("options:", 1)[1].split())  # argparse wraps lines
    return text[text.index(f"{flag} {flag[2:].upper().replace('-', '_')}"):].split(" --", 1)[0]


@pytest.mark.parametrize(("flag", "column"), [("--base-lr", 0), ("--weight-decay", 1), ("--tau-base", 2)])
def test_the_help_states_the_recipe_the_code_resolves(flag, column):
    said = help_of(flag)
    # "else 0.2 from 1000 epochs, 0.3 from 300, 0.45 below": every value the help names, at each boundary.
    ladder = re.search(r"else (.*) below", said)[1]
    steps = [(int(start), float(value)) for value, start in re.findall(r"([\d.e-]+) from (\d+)", ladder)]
    below = float(ladder.rsplit(", ", 1)[1])
    for epochs, expected in RECIPE.items():
        resolved = getattr(TrainConfig(epochs=epochs, res=224).resolved(), flag[2:].replace("-", "_"))
        assert resolved == expected[column]
        assert resolved == next((value for start, value in steps if epochs >= start), below), said
    small = float(re.search(r"default: ([\d.e-]+) for small images", said)[1])
    assert small == getattr(TrainConfig(res=28).resolved(), flag[2:].replace("-", "_"))


def test_every_option_says_its_default_in_the_help():
    text = " ".join(build_parser().format_help().split())
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert f.default is None or f"(default: {f.default})" in text, f.name
    # The options whose default is a rule: the rule, with the values `resolved` gives (checked below).
    for says in ["--eta ETA LARS trust coefficient (default: 0.02 for small images, else 0.001)",
                 "capped at 10% of the run's steps (default: 10.0)",
                 "(default: 0.2 for small images, measured in docs/recipe.md; else the recipe's 0.08)",
                 "(default: resnet18 for small images, else resnet50)", "(default: 28 for the built-in fashion-mnist",
                 "(default: on, off for small images)", "(default: on when --res <= 64)", "(default: all)",
                 "(default: --epochs x the steps of an epoch)"]:
        assert says in text
    small, large = TrainConfig(res=28).resolved(), TrainConfig(res=65).resolved()
    assert (small.eta, small.arch, small.blur, small.small_images) == (0.02, "resnet18", False, True)
    assert (large.eta, large.arch, large.blur, large.small_images) == (1e-3, "resnet50", True, False)
    assert BYOL_VIEWS.with_overrides(min_scale=large.min_scale).crop_scale[0] == 0.08
    assert warmup_steps(1000, 100, 10.0) == 100 and warmup_steps(1000, 100, 50.0) == 100  # the 10% cap


def test_the_readme_options_table_names_every_option():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Options\n"):readme.index("\n## ", readme.index("## Options\n") + 1)]
    rows = " ".join(line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `"))
    missing = [option_flag(f.name) for f in fields(TrainConfig) if f"`{option_flag(f.name)}" not in rows]
    assert not missing, f"options missing from the README's options table: {missing}"


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_then_command_line(tmp_path, suffix):
    body = ('arch = "resnet34"\nbatch-size = 512\nbase_lr = 1\ncompile = false\n' if suffix == ".toml"
            else "arch: resnet34\nbatch-size: 512\nbase_lr: 1\ncompile: false\n")
    path = tmp_path / f"run{suffix}"
    path.write_text(body)
    cfg = parse_config(["--config", str(path), "--batch-size", "1024"])
    assert (cfg.arch, cfg.batch_size, cfg.base_lr, cfg.compile) == ("resnet34", 1024, 1.0, False)
    assert isinstance(cfg.base_lr, float)


def test_finetune_takes_shares_from_the_command_line_or_a_config_file(tmp_path):
    text = " ".join(build_parser().format_help().split("options:", 1)[1].split())
    assert parse_config([]).finetune is None and "(default: off;" in text[text.index("--finetune [SHARE ...]"):]
    assert parse_config(["--finetune", "1%", "10%"]).finetune == ("1%", "10%")
    path = tmp_path / "run.toml"
    path.write_text('finetune = ["1%", 0.1]\n')
    assert parse_config(["--config", str(path)]).finetune == ("1%", "0.1")
    assert parse_config(["--config", str(path), "--finetune"]).finetune == ()  # a bare flag turns it off


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
    from config import FIXED, QUIET, REFUSED, options_on_resume

    # What shapes the saved tensors (the networks and the optimizer state) cannot change on resume...
    assert sorted(options_on_resume(REFUSED)) == ["arch", "hidden_dim", "optimizer", "proj_dim", "small_images",
                                                  "width"]
    # The schedule and the data cannot change mid-run either: a new run takes another --out...
    assert sorted(options_on_resume(FIXED)) == ["base_lr", "batch_size", "blur", "bn_per_view", "data", "epochs",
                                                "eta", "in_memory", "jitter", "loader", "lr_1d_scale", "min_scale",
                                                "momentum", "res", "seed", "steps", "tau_base", "warmup_epochs",
                                                "weight_decay", "zero_init_residual"]
    # ...and where and how fast the run goes, and how often it logs, changes without a note.
    assert sorted(options_on_resume(QUIET)) == ["compile", "device", "gpus", "log_every", "out", "processes",
                                                "resume", "time_limit", "workers"]
