"""Encoders: torchvision ResNets without their classifier, optionally narrower and with a small-image stem."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
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
# Fewer input channels than one AVX2 register of floats: see SubsampledPointwiseConv.
AVX2_FLOATS = 8
# Fewer channels than one AVX-512 register of floats: see NarrowBatchNorm2d.
AVX512_FLOATS = 16


class SubsampledPointwiseConv(nn.Conv2d):
    """A strided 1x1 conv (a ResNet shortcut) that, on the CPU with fewer than AVX2_FLOATS input channels,
    subsamples first and then runs a stride-1 1x1 conv: the same numbers and gradients. Why: oneDNN's AVX2
    backward of a channels_last strided 1x1 conv with fewer than 8 input channels writes past its buffer
    (torch 2.14.1 CPU; found as "corrupted double-linked list" / a segfault in a later allocation, e.g. a
    width-4 ResNet's shortcut), while the stride-1 kernel is sound. Elsewhere it is a plain Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.in_channels < AVX2_FLOATS:
            return F.conv2d(x[:, :, ::self.stride[0], ::self.stride[1]], self.weight, self.bias)
        return super().forward(x)

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> SubsampledPointwiseConv:
        """A module holding `conv`'s own parameters (built on the meta device: no random numbers drawn, so a
        width-64 net keeps torchvision's initialisation)."""
        new = cls(conv.in_channels, conv.out_channels, 1, conv.stride, bias=conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        return new


class NarrowBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that, on the CPU, normalises a channels_last input of fewer than AVX512_FLOATS channels
    which needs a gradient in NCHW and hands the result back channels_last: the same numbers and gradients.
    Why: torch's channels_last CPU batch-norm backward at those widths is 3-6x slower than its NCHW one
    (torch 2.14.1, Xeon: 3.6 ms against 0.6 for 64x8x28x28 fp32): with it the width-8 quickstart step runs
    1.12x (fp32) and 1.11x (bf16) as fast (`python -m benchmark.narrow_bn`,
    `benchmark/results/cpu-2026-12-06-narrow-bn.json`). Without a gradient
    (the target network, evaluation) the channels_last forward is the faster one and runs as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and self.num_features < AVX512_FLOATS and x.requires_grad
                and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class ScaledResNet(tvm.ResNet):
    """torchvision's ResNet with every stage `width / 64` times as wide; `width=64` is torchvision's net
    with the same parameter names and initialisation.

    Parameters
    ----------
    block, layers: torchvision's block class and blocks per stage (a value of ARCHS).
    width: the stem's output channels (64: torchvision's net); the stages have 1x, 2x, 4x, 8x of it.
    zero_init_residual: each residual block's last batch norm starts at scale 0 (`build_backbone`).
    """

    def __init__(self, block: type[nn.Module], layers: list[int], width: int = DEFAULT_WIDTH,
                 zero_init_residual: bool = False) -> None:
        self.width = width  # read by _make_layer, which the parent's __init__ calls
        super().__init__(block, layers, zero_init_residual=zero_init_residual, norm_layer=NarrowBatchNorm2d)
        if width != DEFAULT_WIDTH:
            self.conv1 = _kaiming(nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False))
            self.bn1 = NarrowBatchNorm2d(width)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == DEFAULT_WIDTH:  # the first stage: it takes the (scaled) stem's output
            self.inplanes = self.width
        layer = super()._make_layer(block, planes * self.width // DEFAULT_WIDTH, blocks, stride, dilate)
        shortcut = layer[0].downsample
        if shortcut is not None and shortcut[0].stride != (1, 1):
            shortcut[0] = SubsampledPointwiseConv.replacing(shortcut[0])
        return layer


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    """torchvision's ResNet initialisation for a conv added after construction."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def feature_dim(arch: str, width: int = DEFAULT_WIDTH) -> int:
    """The encoder's output size: the last stage's channels, 8 * width times the block's expansion."""
    return 8 * width * ARCHS[arch][0].expansion


def build_backbone(arch: str, small_images: bool = False, width: int = DEFAULT_WIDTH,
                   zero_init_residual: bool = False) -> tuple[nn.Module, int]:
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
    zero_init_residual: start each residual block's last batch-norm scale at 0, so that every block begins as
        its shortcut (torchvision's option; Goyal et al. 2017). The official BYOL code does it in bottleneck
        blocks; the small-image recipe does it in the quickstart's basic blocks (measured in docs/recipe.md).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if width < 1:
        raise ValueError(f"--width must be at least 1, got {width}")
    block, layers = ARCHS[arch]
    net = ScaledResNet(block, layers, width=width, zero_init_residual=zero_init_residual)
    net.fc = nn.Identity()
    if small_images:
        net.conv1 = _kaiming(nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False))
        net.maxpool = nn.Identity()
    return net, feature_dim(arch, width)
