"""BYOL pretraining.

    python train.py --loader synthetic --device cpu --arch resnet18 --res 64 --batch-size 32 --steps 20
"""

from __future__ import annotations

import sys
import time

import torch

from config import TrainConfig, build_parser, config_from_args
from models.backbones import build_backbone
from models.byol import BYOL
from models.optim import build_optimizer
from models.schedules import lr_at, scaled_lr, tau_at
from models.step import ByolStep
from pipelines.base import LoaderConfig, LoaderUnavailable
from pipelines.registry import build_loader
from pipelines.views import BYOL_VIEWS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def view_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Views arrive in the autocast dtype on CUDA (half the bytes); fp32 on CPU unless bf16 was asked."""
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
    return torch.float32


def build_model(cfg: TrainConfig, device: torch.device) -> BYOL:
    encoder, feature_dim = build_backbone(cfg.arch, small_images=bool(cfg.small_images))
    byol = BYOL(encoder, feature_dim, cfg.hidden_dim, cfg.proj_dim, bn_per_view=cfg.bn_per_view)
    return byol.to(device, memory_format=torch.channels_last)


def train(cfg: TrainConfig) -> dict[str, float]:
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    recipe = BYOL_VIEWS.with_overrides(res=cfg.res, min_scale=cfg.min_scale)
    loader = build_loader(cfg.loader, LoaderConfig(
        data=cfg.data, batch_size=cfg.batch_size, recipe=recipe, device=device,
        dtype=view_dtype(cfg, device), workers=cfg.workers, seed=cfg.seed,
    ))
    steps_per_epoch = len(loader)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size)

    byol = build_model(cfg, device)
    optimizer = build_optimizer(cfg.optimizer, byol.online.parameters(), peak_lr, cfg.weight_decay,
                                cfg.momentum, cfg.eta, device)
    precision = cfg.precision if device.type == "cuda" else "fp32"
    step_fn = ByolStep(byol, optimizer, device, precision=precision, compile=cfg.compile)

    print(f"training {cfg.arch} on {cfg.loader}:{cfg.data} at {cfg.res}px, batch {cfg.batch_size}, "
          f"{total_steps} steps on {device}")
    step, last_loss, window_start, window_images = 0, float("nan"), time.perf_counter(), 0
    images_per_second = 0.0
    while step < total_steps:
        loader.set_epoch(step // steps_per_epoch)
        for view1, view2, _ in loader:
            loss = step_fn(view1, view2, lr_at(step, total_steps, peak_lr, warmup_steps),
                           tau_at(step, total_steps, cfg.tau_base))
            step += 1
            window_images += view1.shape[0]
            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = loss.item()  # the only host sync: once per log window
                elapsed = time.perf_counter() - window_start
                images_per_second = window_images / elapsed
                print(f"step {step:6d}/{total_steps}  loss {last_loss:.4f}  "
                      f"lr {lr_at(step, total_steps, peak_lr, warmup_steps):.4g}  {images_per_second:,.0f} img/s")
                window_start, window_images = time.perf_counter(), 0
            if step == total_steps:
                break
    return {"loss": last_loss, "images_per_second": images_per_second, "steps": step}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(config_from_args(args))
    except (ValueError, LoaderUnavailable) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
