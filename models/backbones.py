"""Encoders: torchvision ResNets without their classifier, optionally narrower and with a small-image stem."""

from __future__ import annotations

import torch.nn as nn
import torchvision.models as tvm

# (block, blocks per stage) of torchvision's constructors.
ARCHS = {
    "resnet18": (tvm.resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tvm.resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tvm.resnet.Bottleneck, [3, 4, 6, 3]),
}
# Inputs at or below this size get the CIFAR-style stem (3x3 stride-1 conv, no max-pool).
SMALL_IMAGE_MAX_RES = 64
# torchvision's stem width; stage widths are 1x, 2x, 4x, 8x of it.
DEFAULT_WIDTH = 64


class ScaledResNet(tvm.ResNet):
    """torchvision's ResNet with every stage `width / 64` times as wide; `width=64` is torchvision's net
    with the same parameter names and initialisation.

    Parameters
    ----------
    block, layers: torchvision's block class and blocks per stage (a value of ARCHS).
    width: the stem's output channels (64: torchvision's net); the stages have 1x, 2x, 4x, 8x of it.
    """

    def __init__(self, block: type[nn.Module], layers: list[int], width: int = DEFAULT_WIDTH) -> None:
        self.width = width  # read by _make_layer, which the parent's __init__ calls
        super().__init__(block, layers)
        if width != DEFAULT_WIDTH:
            self.conv1 = _kaiming(nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False))
            self.bn1 = nn.BatchNorm2d(width)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == DEFAULT_WIDTH:  # the first stage: it takes the (scaled) stem's output
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // DEFAULT_WIDTH, blocks, stride, dilate)


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    """torchvision's ResNet initialisation for a conv added after construction."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def feature_dim(arch: str, width: int = DEFAULT_WIDTH) -> int:
    """The encoder's output size: the last stage's channels, 8 * width times the block's expansion."""
    return 8 * width * ARCHS[arch][0].expansion


def build_backbone(arch: str, small_images: bool = False, width: int = DEFAULT_WIDTH) -> tuple[nn.Module, int]:
    """Return (encoder, feature_dim). The encoder maps (B, 3, H, W) to (B, feature_dim).

    Parameter names match torchvision's, so at the default width `encoder.state_dict()` loads into
    `tvm.<arch>()` with strict=False (only `fc.*` missing) — that is the exported backbone format; any
    width loads into `build_backbone(arch, small_images, width)`.

    Parameters
    ----------
    arch: a key of ARCHS ('resnet18', 'resnet34', 'resnet50'); ValueError otherwise.
    small_images: the CIFAR-style stem (3x3 stride-1 conv, no max-pool) for inputs of at most
        SMALL_IMAGE_MAX_RES px; False keeps ImageNet's 7x7 stride-2 conv and max-pool.
    width: the stem's output channels (torchvision's 64); the stages are 1x, 2x, 4x, 8x of it, so
        feature_dim is 8 * width (resnet18/34) or 32 * width (resnet50).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if width < 1:
        raise ValueError(f"--width must be at least 1, got {width}")
    block, layers = ARCHS[arch]
    net = ScaledResNet(block, layers, width=width)
    net.fc = nn.Identity()
    if small_images:
        net.conv1 = _kaiming(nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False))
        net.maxpool = nn.Identity()
    return net, feature_dim(arch, width)
