"""Every argument checked before any process starts: one clear line per problem (exit 2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from config import TrainConfig, option_flag, option_type
from datasets.builtin import FASHION_MNIST, parse_builtin
from pipelines.registry import INSTALL_HINTS, is_available
from pipelines.views import BYOL_VIEWS
from runtime.checkpoint import CheckpointDir
from runtime.distributed import planned_processes, under_launcher, visible_gpus


def checkpoint_dir(cfg: TrainConfig) -> CheckpointDir:
    return CheckpointDir(Path(cfg.out) / "checkpoints", cfg.keep_checkpoints)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# The float options' meaningful ranges (checked after `TrainConfig.resolved` filled them); the counts and
# times that only need >= 0 are checked with the ints in `check`.
FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "base_lr": (lambda v: v > 0, "above 0"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eta": (lambda v: v > 0, "above 0"),
    "tau_base": (lambda v: 0 <= v <= 1, "in [0, 1] (the target's EMA weight on its own past)"),
}


def check_floats(cfg: TrainConfig) -> None:
    """NaN, inf and out-of-range floats would only show up steps later, as a NaN loss or a silent no-op."""
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if option_type(f.name) is float and value is not None:
            _require(math.isfinite(value), f"{option_flag(f.name)} must be a finite number, got {value}")
    for name, (inside, meaning) in FLOAT_RANGES.items():
        _require(inside(getattr(cfg, name)), f"{option_flag(name)} must be {meaning}, got {getattr(cfg, name)}")


def check(cfg: TrainConfig) -> int:
    """Raise ValueError (message = the one line to print) on bad input; return the world size."""
    check_floats(cfg)
    BYOL_VIEWS.with_overrides(res=cfg.res, min_scale=cfg.min_scale)
    for name in ("batch_size", "epochs", "log_every", "keep_checkpoints", "processes", "hidden_dim", "proj_dim",
                 "width"):
        _require(getattr(cfg, name) >= 1, f"{option_flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "checkpoint_minutes", "eval_every", "workers", "warmup_epochs"):
        _require(getattr(cfg, name) >= 0, f"{option_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("steps", "eval_limit"):
        value = getattr(cfg, name)
        _require(value is None or value >= 1, f"{option_flag(name)} must be at least 1, got {value}")

    if not under_launcher():
        _require(cfg.device != "cuda" or visible_gpus() > 0,
                 "--device cuda: no CUDA device is visible on this machine; use --device cpu")
        gpus = visible_gpus() if cfg.gpus is None else cfg.gpus
        _require(gpus >= 0, f"--gpus must be >= 0, got {gpus}")
        _require(gpus <= visible_gpus(), f"--gpus {gpus}: only {visible_gpus()} GPU(s) visible on this machine")
        _require(gpus == 0 or cfg.processes == 1,
                 "--processes is for CPU runs (--gpus 0); with GPUs there is one process per GPU")
    _, world_size = planned_processes(cfg.gpus, cfg.processes)
    _require(cfg.batch_size % world_size == 0,
             f"--batch-size {cfg.batch_size} (global) is not divisible by the {world_size} processes")

    _require(cfg.in_memory or world_size == 1,
             f"--no-in-memory (FFCV's QUASI_RANDOM order) runs in one process, not {world_size}; "
             "drop it to train on several")
    hint = INSTALL_HINTS.get(cfg.loader, "pip install -e .")
    _require(is_available(cfg.loader), f"--loader {cfg.loader} is not installed; install it with: {hint}")
    folder = Path(cfg.data)
    _require(cfg.loader != "ffcv" or not folder.is_dir(),
             f"--data {cfg.data} is a folder; --loader ffcv reads a .beton file: convert it with python -m "
             f"datasets.ffcv_convert --src {cfg.data} --out {folder.resolve()}.beton")
    builtin = parse_builtin(cfg.data)
    if builtin is not None:
        _require(builtin.is_dir(), f"--data {cfg.data}: the Fashion-MNIST idx folder {builtin} does not exist "
                 "(scripts/setup.sh installs it; or give fashion-mnist:<folder>)")
    elif cfg.loader != "synthetic" or cfg.eval_every:
        _require(Path(cfg.data).exists(), f"--data {cfg.data}: no such file or folder (give an ImageFolder root, "
                 f"a .beton file for --loader ffcv, or {FASHION_MNIST}[:<idx folder>])")
    if cfg.eval_every and builtin is None:
        _require(cfg.val_data is not None and Path(cfg.val_data).is_dir(),
                 f"--eval-every with --data {cfg.data} needs --val-data, an existing labelled ImageFolder "
                 "to report kNN / linear-probe accuracy on")

    out = Path(cfg.out)
    _require(not out.exists() or out.is_dir(), f"--out {cfg.out} exists and is not a folder")
    return world_size


def check_out_contents(cfg: TrainConfig) -> None:
    """Checked once this run holds --out: before that, the checkpoints may be a live run's (see OutLock)."""
    _require(cfg.resume or not checkpoint_dir(cfg).paths(),
             f"--out {cfg.out} already holds checkpoints: pass --resume to continue that run, "
             "or choose another --out")
