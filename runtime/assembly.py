"""A run's parts built from its config: the data path, this rank's loader shard, the BYOL model, its
optimizer and step, and the schedules. train.py and the benchmark build their runs with these, so both
measure and train the same thing."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from config import TrainConfig
from datasources.builtin import resolve_data
from datasources.imagefolder import scan_image_folder
from models.backbones import build_backbone
from models.byol import BYOL
from models.step import ByolStep, step_precision, view_dtype
from optim.factory import build_optimizer
from optim.schedules import Schedule, scaled_lr, warmup_steps
from pipelines.base import LoaderConfig, TwoViewLoader
from pipelines.registry import build_loader
from pipelines.views import BYOL_VIEWS
from runtime.distributed import World, barrier


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (the loaders draw their own from LoaderConfig.seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_data_main_first(cfg: TrainConfig, world: World) -> str:
    """--data as the loader reads it; rank 0 builds the built-in dataset's cache, the others then find it."""
    if not world.is_main:
        barrier(world)
    data = resolve_data(cfg.loader, cfg.data)
    if world.is_main:
        barrier(world)
    return data


def loader_config(cfg: TrainConfig, world: World, data: str) -> LoaderConfig:
    """This rank's share of the run's loading: batch = global batch / world size, views in the step's dtype.

    Parameters
    ----------
    cfg: the run's options (loader, views, batch, workers, seed).
    world: this process's place in the run (rank, size, device).
    data: --data as the loader reads it (`resolve_data_main_first`).
    """
    return LoaderConfig(
        data=data, batch_size=cfg.batch_size // world.size,
        recipe=BYOL_VIEWS.with_overrides(res=cfg.res, min_scale=cfg.min_scale, blur=bool(cfg.blur),
                                          jitter=cfg.jitter),
        device=world.device,
        dtype=view_dtype(cfg.precision, world.device), workers=cfg.workers, seed=cfg.seed,
        rank=world.rank, world_size=world.size, compile=cfg.compile, in_memory=cfg.in_memory,
    )


def make_loader(cfg: TrainConfig, world: World, data: str) -> TwoViewLoader:
    """This rank's shard of --loader over `data`; ValueError (one line) when it has no full batch."""
    try:
        loader = build_loader(cfg.loader, loader_config(cfg, world, data))
    except RuntimeError:  # DALI refuses to build a pipeline without a full batch: say that, in one line
        check_batch_fits(cfg, world, data)
        raise
    if len(loader) == 0:
        check_batch_fits(cfg, world, data)
        raise ValueError(f"--batch-size {cfg.batch_size}: {cfg.data} has no full batch per epoch for "
                         f"{world.size} process(es); lower --batch-size")
    return loader


def check_batch_fits(cfg: TrainConfig, world: World, data: str) -> None:
    """Raise the one-line error when an ImageFolder has fewer decodable images per process than the batch
    (no full batch per epoch). Called only once a loader found no full batch: the scan is not free."""
    if not Path(data).is_dir():
        return
    images = len(scan_image_folder(data).samples)
    if cfg.batch_size // world.size > images // world.size:
        largest = images // world.size * world.size
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {images} images of {cfg.data}"
                         + (f" over {world.size} processes" if world.size > 1 else "")
                         + f", so an epoch has no full batch; use --batch-size {largest} or less")


def describe_run(cfg: TrainConfig, world: World, data: str, step: int, total_steps: int) -> str:
    """The startup line: what the run reads (synthetic reads nothing; a built-in name shows its cache), where, and
    which steps are left."""
    if cfg.loader == "synthetic":
        source = "synthetic random views (--loader synthetic reads no data)"
    else:
        source = (cfg.data if data == cfg.data else f"{cfg.data} ({data})") + f" via the {cfg.loader} loader"
    return (f"training {cfg.arch} on {source} at {cfg.res}px, global batch {cfg.batch_size} over {world.size} "
            f"process(es) on {world.device.type}, "
            + (f"steps {step}->{total_steps}" if step < total_steps else
               f"nothing left to train (step {step} of {total_steps}): writing the final outputs"))


def build_encoder(cfg: TrainConfig) -> tuple[torch.nn.Module, int]:
    """The --arch encoder at --width with the stem --small-images picks and --zero-init-residual's blocks, and its
    feature size."""
    return build_backbone(cfg.arch, bool(cfg.small_images), cfg.width, bool(cfg.zero_init_residual))


def build_model(cfg: TrainConfig, device: torch.device) -> BYOL:
    """Online and target networks, channels-last on `device`; seed first for the same weights on every rank."""
    encoder, feature_dim = build_encoder(cfg)  # drawn first: random_init_encoder repeats exactly these draws
    byol = BYOL(encoder, feature_dim, cfg.hidden_dim, cfg.proj_dim, bn_per_view=cfg.bn_per_view)
    return byol.to(device, memory_format=torch.channels_last)


def random_init_encoder(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The run's encoder as it was before training (same seed, same draws): the baseline training must beat.
    Only the encoder is built: BYOL's heads and target copy would be thrown away."""
    seed_all(cfg.seed)
    return build_encoder(cfg)[0].to(device, memory_format=torch.channels_last)


def build_step(cfg: TrainConfig, byol: BYOL, device: torch.device, online: torch.nn.Module | None = None) -> ByolStep:
    """The optimizer (lr scaled by the global batch) and the whole BYOL step for `byol`.

    Parameters
    ----------
    cfg: the run's options (optimizer and its hyper-parameters, precision, compile).
    byol: the model `build_model` made; the optimizer takes its online network's parameters.
    device: where the step runs; the precision follows it (`models.step.step_precision`).
    online: the module that runs the online network, DDP(byol.online) under DDP (default: byol.online).
    """
    optimizer = build_optimizer(cfg.optimizer, byol.online.parameters(), scaled_lr(cfg.base_lr, cfg.batch_size),
                                cfg.weight_decay, cfg.momentum, cfg.eta, device, cfg.lr_1d_scale)
    return ByolStep(byol, optimizer, device, precision=step_precision(cfg.precision, device), compile=cfg.compile,
                    online=online)


def build_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The run's length (--steps, else --epochs of the loader's epochs), lr warmup and cosine, and tau."""
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    return Schedule(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                    peak_lr=scaled_lr(cfg.base_lr, cfg.batch_size),
                    warmup_steps=warmup_steps(total_steps, steps_per_epoch, cfg.warmup_epochs),
                    tau_base=cfg.tau_base)
