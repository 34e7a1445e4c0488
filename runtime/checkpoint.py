"""Crash-safe checkpoints: atomic writes, a checksum trailer, keep-last-K, newest-valid resume.

File layout: the bytes of `torch.save(state)` followed by MAGIC and the SHA-256 of those bytes.
A write (`foundation.atomic_files.atomic_write`) goes to a temp file in the same folder, is flushed
and fsync'ed, renamed over the final name with os.replace (atomic on POSIX) and the folder is fsync'ed,
so a crash leaves either the old set of files or the new one, never a half-written checkpoint under a
final name. Reading verifies the trailer and loads with `torch.load(weights_only=True)`: a state holds only tensors
and plain containers of numbers and strings (RNG states are converted to tensors for this).
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundation.atomic_files import atomic_write, sweep_stale_temp_files
from models.export import BackboneInfo, save_backbone
from runtime.distributed import World, gather_to_main

MAGIC = b"FBYOLCK1"
DIGEST_BYTES = 32
NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CorruptCheckpoint(RuntimeError):
    pass


def _serialize(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    body = _serialize(state)
    atomic_write(path, body + MAGIC + hashlib.sha256(body).digest())


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load and verify one checkpoint; raise CorruptCheckpoint if it is truncated or altered."""
    data = path.read_bytes()
    body, magic, digest = data[:-40], data[-40:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if magic != MAGIC:
        raise CorruptCheckpoint(f"{path}: no checksum trailer (truncated or not a fastbyol checkpoint)")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptCheckpoint(f"{path}: checksum mismatch (file is corrupt)")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as err:  # the checksum matched, so this is a format problem: still unusable
        raise CorruptCheckpoint(f"{path}: cannot be loaded ({err})") from err


class CheckpointDir:
    """`ckpt-<step>.pt` files in one folder; only the main process writes."""

    def __init__(self, folder: Path, keep: int):
        self.folder = folder
        self.keep = keep

    def sweep_stale_temp_files(self) -> list[Path]:
        """Called by the process that owns the folder (it holds the --out lock) when it opens it."""
        return sweep_stale_temp_files(self.folder)

    def paths(self) -> list[Path]:
        """Checkpoints, newest (highest step) first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"ckpt-{step:09d}.pt"
        save_checkpoint(path, state)
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def load_newest_valid(self, map_location: torch.device | str = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies; each bad one is skipped with a warning."""
        paths = self.paths()
        for path in paths:
            try:
                return path, load_checkpoint(path, map_location)
            except (CorruptCheckpoint, OSError) as err:
                print(f"warning: skipping checkpoint {err}; trying the previous one", file=sys.stderr)
        if paths:
            raise CorruptCheckpoint(f"none of the {len(paths)} checkpoints in {self.folder} is valid")
        return None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python) as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s output. Every tensor is read through a CPU copy: a checkpoint loaded with
    a CUDA map_location holds the RNG states on the GPU, where `.numpy()` and the setters refuse them."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def export_backbone(path: Path, encoder: torch.nn.Module, config: dict[str, Any]) -> BackboneInfo:
    """A run's encoder as `models.export`'s backbone file, described by the run's options (`TrainConfig.to_dict()`,
    resolved); returns what the file says it is."""
    form = {"arch": config["arch"], "width": config["width"], "small_images": bool(config["small_images"]),
            "res": config["res"], "zero_init_residual": bool(config["zero_init_residual"])}
    return save_backbone(path, encoder, **form)


def training_state(
    byol: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
    step: int, steps_per_epoch: int, rng: list[dict[str, Any]], config: dict[str, Any], elapsed_s: float = 0.0,
) -> dict[str, Any]:
    """Everything a resume needs; `rng` holds one RNG state per rank, in rank order. `elapsed_s`: training
    wall time so far, so the metrics' elapsed_s carries on after a resume instead of restarting at 0."""
    return {
        "format": 1,
        "step": step,
        "elapsed_s": elapsed_s,
        "epoch": step // steps_per_epoch,
        "steps_into_epoch": step % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "online": byol.online.state_dict(),
        "target": byol.target.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng,
        "config": config,
    }


def restore_training_state(state: dict[str, Any], byol: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler | None) -> None:
    byol.online.load_state_dict(state["online"])
    byol.target.load_state_dict(state["target"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])


class Diverged(RuntimeError):
    """The loss or the weights became NaN or infinite: the run stops without saving that state."""


def run_checkpoints(out: Path, keep: int) -> CheckpointDir:
    """A run's checkpoint folder: OUT/checkpoints, keeping the newest `keep`."""
    return CheckpointDir(Path(out) / "checkpoints", keep)


class RunCheckpointer:
    """Saves a training run into its CheckpointDir on the run's cadence and keeps its training clock.

    Every rank calls `save` at the same step (the RNG states are gathered to rank 0, which writes).

    Parameters
    ----------
    folder: where the checkpoints go (`run_checkpoints`).
    world: this process's place in the run (`runtime.distributed.World`).
    byol, optimizer, scaler: what is saved (`training_state`); scaler is None unless fp16.
    steps_per_epoch: the loader's epoch length, saved so a resume can tell when it changed.
    config: the run's options as a dict (`TrainConfig.to_dict()`), saved for resume's compatibility check.
    every_epochs: save at the end of every N-th epoch (0: never on epochs).
    every_minutes: save when this many minutes of training passed since the last save (0: never on time).
    elapsed_before: training seconds of the run before this process (a resume's), so elapsed time carries on.
    """

    def __init__(self, folder: CheckpointDir, world: World, byol: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, steps_per_epoch: int, config: dict[str, Any],
                 every_epochs: int, every_minutes: float, elapsed_before: float = 0.0) -> None:
        self.folder, self.world, self.byol, self.optimizer, self.scaler = folder, world, byol, optimizer, scaler
        self.steps_per_epoch, self.config = steps_per_epoch, config
        self.every_epochs, self.every_minutes = every_epochs, every_minutes
        self.last_save = time.monotonic()
        self.started = self.last_save - elapsed_before

    def elapsed_s(self) -> float:
        """Training wall time of the whole run, over resumes."""
        return time.monotonic() - self.started

    def time_due(self) -> bool:
        return self.every_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.every_minutes

    def epoch_due(self, epoch: int) -> bool:
        """Whether the end of `epoch` (0-based) is a checkpoint point."""
        return self.every_epochs > 0 and (epoch + 1) % self.every_epochs == 0

    def save(self, step: int) -> None:
        # The loss read at a log point comes from before the step's update: check the weights too.
        if not torch.isfinite(torch.stack(torch._foreach_norm(list(self.byol.parameters())))).all():
            raise Diverged(f"the weights became non-finite at step {step}: stopped without saving them")
        rng = gather_to_main(self.world, rng_state())
        if self.world.is_main:
            self.folder.save(step, training_state(self.byol, self.optimizer, self.scaler, step, self.steps_per_epoch,
                                                  rng, self.config, elapsed_s=self.elapsed_s()))
        self.last_save = time.monotonic()
