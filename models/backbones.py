"""Encoders: torchvision ResNets without their classifier, optionally with a small-image stem."""

from __future__ import annotations

import torch.nn as nn
import torchvision.models as tvm

ARCHS = {"resnet18": tvm.resnet18, "resnet34": tvm.resnet34, "resnet50": tvm.resnet50}
# Inputs at or below this size get the CIFAR-style stem (3x3 stride-1 conv, no max-pool).
SMALL_IMAGE_MAX_RES = 64


def build_backbone(arch: str, small_images: bool = False) -> tuple[nn.Module, int]:
    """Return (encoder, feature_dim). The encoder maps (B, 3, H, W) to (B, feature_dim).

    Parameter names match torchvision's, so `encoder.state_dict()` loads into `tvm.<arch>()` with
    strict=False (only `fc.*` missing) — that is the exported backbone format.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = ARCHS[arch](weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_images:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, feature_dim
