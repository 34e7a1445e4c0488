"""Every argument checked before any process starts: one clear line per problem (exit 2)."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import fields
from pathlib import Path

from config import TrainConfig, option_flag, option_type
from datasources.builtin import FASHION_MNIST, parse_builtin
from evaluation.finetune import parse_fractions
from pipelines.registry import INSTALL_HINTS, is_available
from pipelines.views import BYOL_VIEWS
from runtime.backends import cpu_compiler
from runtime.distributed import local_processes, planned_processes, under_launcher, visible_gpus
from runtime.memory import check_fits


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_values(cfg: TrainConfig) -> None:
    """Every option's own range (its `bound`), after `TrainConfig.resolved` filled the None options. NaN,
    inf and out-of-range values would only show up steps later, as a NaN loss or a silent no-op."""
    for f in fields(TrainConfig):
        value, flag = getattr(cfg, f.name), option_flag(f.name)
        if option_type(f.name) is float and value is not None:
            _require(math.isfinite(value), f"{flag} must be a finite number, got {value}")
        bound = f.metadata["bound"]
        if bound is not None and value is not None:
            _require(bound.accepts(value), f"{flag} must be {bound.meaning}, got {value}")


def check(cfg: TrainConfig) -> int:
    """Raise ValueError (message = the one line to print) on bad input; return the world size."""
    check_values(cfg)
    BYOL_VIEWS.with_overrides(res=cfg.res, min_scale=cfg.min_scale)
    parse_fractions(cfg.finetune or (), "--finetune")

    if not under_launcher():
        _require(cfg.device != "cuda" or visible_gpus() > 0,
                 "--device cuda: no CUDA device is visible on this machine; use --device cpu")
        gpus = visible_gpus() if cfg.gpus is None else cfg.gpus
        _require(gpus <= visible_gpus(), f"--gpus {gpus}: only {visible_gpus()} GPU(s) visible on this machine")
        _require(gpus == 0 or cfg.processes == 1,
                 "--processes is for CPU runs (--gpus 0); with GPUs there is one process per GPU")
    gpus, world_size = planned_processes(cfg.gpus, cfg.processes)
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
             f"datasources.ffcv_convert --src {cfg.data} --out {folder.resolve()}.beton")
    builtin = parse_builtin(cfg.data)
    if builtin is not None:
        _require(builtin.is_dir(), f"--data {cfg.data}: the Fashion-MNIST idx folder {builtin} does not exist "
                 "(scripts/setup.sh installs it; or give fashion-mnist:<folder>)")
    elif cfg.loader != "synthetic" or cfg.eval_every or cfg.finetune:
        _require(Path(cfg.data).exists(), f"--data {cfg.data}: no such file or folder (give an ImageFolder root, "
                 f"a .beton file for --loader ffcv, or {FASHION_MNIST}[:<idx folder>])")
    if cfg.eval_every and builtin is None:
        _require(cfg.val_data is not None and Path(cfg.val_data).is_dir(),
                 f"--eval-every with --data {cfg.data} needs --val-data, an existing labelled ImageFolder "
                 "to report kNN / linear-probe accuracy on")
    if cfg.finetune and builtin is None:
        _require(cfg.val_data is not None and Path(cfg.val_data).is_dir(),
                 f"--finetune with --data {cfg.data} needs --val-data, an existing labelled ImageFolder of other "
                 "images than --data's to score the fine-tunes on")

    if cfg.compile and not (gpus > 0 and visible_gpus() > 0):
        _require(cpu_compiler() is not None,
                 "--compile on CPU builds the step's kernels with a C++ compiler and none was found (g++, clang++ "
                 "or $CXX): install one (apt-get install g++) or pass --no-compile")
    out = Path(cfg.out)
    _require(not out.exists() or out.is_dir(), f"--out {cfg.out} exists and is not a folder")
    # Last: the estimate builds the networks on the meta device, worth it only for a run that passed the rest.
    check_fits(cfg, world_size, use_cuda=gpus > 0 and visible_gpus() > 0)
    return world_size


def warn(cfg: TrainConfig, world_size: int) -> None:
    """Print a warning line for each option that runs, but not as the user likely meant."""
    if cfg.loader == "synthetic" and cfg.data != TrainConfig.data:
        print(f"train.py: warning: --loader synthetic makes random views on the device and ignores --data "
              f"{cfg.data}; name a real --loader to train on it", file=sys.stderr)
    cores, processes = len(os.sched_getaffinity(0)), local_processes(world_size)
    if cfg.loader != "synthetic" and cfg.workers * processes > cores:
        print(f"train.py: warning: --workers {cfg.workers} x {processes} training process(es) is more than this "
              f"machine's {cores} usable cores; loader and training step will share them (lower --workers)",
              file=sys.stderr)
