"""A tiny BYOL step (models/step.py's ByolStep on tiny_models.tiny_byol with the fused LARS) and the
fixed pair of channels_last views the step tests feed it."""

from __future__ import annotations

import torch
from tiny_models import tiny_byol

from models.step import ByolStep
from optim.factory import build_optimizer


def fixed_views(batch: int = 16, res: int = 8, device: str = "cpu"):
    gen = torch.Generator().manual_seed(3)
    v1 = torch.randn(batch, 3, res, res, generator=gen)
    v2 = v1 + 0.3 * torch.randn(batch, 3, res, res, generator=gen)
    return (v.to(device).contiguous(memory_format=torch.channels_last) for v in (v1, v2))


def make_step(compile: bool, device: str = "cpu", precision: str = "fp32") -> ByolStep:
    byol = tiny_byol().to(device, memory_format=torch.channels_last)
    opt = build_optimizer("lars", byol.online.parameters(), lr=1.0, weight_decay=1e-6, device=device)
    return ByolStep(byol, opt, torch.device(device), precision=precision, compile=compile)
