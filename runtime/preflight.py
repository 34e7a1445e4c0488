"""Every argument checked before any process starts: one clear line per problem (exit 2)."""

from __future__ import annotations

from pathlib import Path

from config import TrainConfig
from pipelines.builtin import FASHION_MNIST, parse_builtin
from pipelines.registry import INSTALL_HINTS, is_available
from pipelines.views import BYOL_VIEWS
from runtime.checkpoint import CheckpointDir
from runtime.distributed import planned_processes, under_launcher, visible_gpus


def checkpoint_dir(cfg: TrainConfig) -> CheckpointDir:
    return CheckpointDir(Path(cfg.out) / "checkpoints", cfg.keep_checkpoints)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check(cfg: TrainConfig) -> int:
    """Raise ValueError (message = the one line to print) on bad input; return the world size."""
    BYOL_VIEWS.with_overrides(res=cfg.res, min_scale=cfg.min_scale)
    for name in ("batch_size", "epochs", "log_every", "keep_checkpoints", "processes", "hidden_dim", "proj_dim",
                 "width"):
        _require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "checkpoint_minutes", "eval_every", "workers", "warmup_epochs"):
        _require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ("steps", "eval_limit"):
        value = getattr(cfg, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")

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
    _require(cfg.resume or not checkpoint_dir(cfg).paths(),
             f"--out {cfg.out} already holds checkpoints: pass --resume to continue that run, "
             "or choose another --out")
    return world_size
