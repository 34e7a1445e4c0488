"""Tiny networks for fast CPU tests: a small BYOL (conv, BN, ReLU, pooled encoder) and a conv -> BN
-> mean encoder small enough to check evaluation results by hand."""

from __future__ import annotations

import torch
import torch.nn as nn

from models.byol import BYOL


def tiny_encoder() -> tuple[nn.Module, int]:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 8


def tiny_byol(bn_per_view: bool = True) -> BYOL:
    torch.manual_seed(0)
    encoder, dim = tiny_encoder()
    return BYOL(encoder, dim, hidden_dim=16, proj_dim=4, bn_per_view=bn_per_view)


class TinyEncoder(nn.Module):
    """conv -> BN -> global mean: small enough to check by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean(dim=(2, 3))
